#!/usr/bin/env python3
"""PyTorch DistributedDataParallel reference for bench/run_scaling.sh: the weak-scaling run of
`ddpm launch` with torch's own data parallelism.

W processes on this host (gloo over 127.0.0.1, one intra-op thread each), each training
diffusers' UNet2DModel (built from the config.json `ddpm-bench diffusers-config` prints) on its
own batch of B images with the training step of bench/reference_unet.py (flip, t, noise,
eps-MSE, backward with DDP's bucketed gradient all-reduce, clip, Adam, warmup, EMA). Prints one
JSON line: images/s over all workers = W * B / median step time after --skip steps.

Usage:
    python bench/reference_ddp.py --config configs/quickstart.toml --unet-config unet.json \
        --workers 2 --batch 32 --steps 80 --skip 20
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_unet  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, args, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.workers)
    args.threads = 1
    args.seed = rank
    cfg, train, data, sched, model, x = reference_unet.build(args)
    step = reference_unet.TrainStep(train, data, sched, model)
    step.model = torch.nn.parallel.DistributedDataParallel(model)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        s = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - s)
    if rank == 0:
        med = statistics.median(times[args.skip:])
        out.put({"impl": "pytorch-ddp-gloo", "workers": args.workers, "batch_per_worker": x.shape[0],
                 "threads_per_worker": torch.get_num_threads(), "median_step_s": med,
                 "images_per_second": args.workers * x.shape[0] / med, "torch": torch.__version__})
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="images per worker")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--skip", type=int, default=20)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.spawn(worker, args=(args, free_port(), out), nprocs=args.workers, join=True)
    print(json.dumps(out.get()))


if __name__ == "__main__":
    main()
