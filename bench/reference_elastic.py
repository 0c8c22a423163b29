#!/usr/bin/env python3
"""torchrun (TorchElastic) reference for bench/run_recovery.sh: the same kill and restart with
PyTorch's own fault tolerance.

Run by `torchrun --standalone --nproc-per-node W --max-restarts 1`: every worker trains
diffusers' UNet2DModel (built from the config.json `ddpm-bench diffusers-config` prints) with
DistributedDataParallel over gloo on 127.0.0.1, one intra-op thread, its share of the config's
global batch (train.batch_size split as evenly as it goes), and the training step of
bench/reference_unet.py. Rank 0 saves the full state (model, EMA, Adam, step) every --checkpoint-every
steps the usual PyTorch way (torch.save to a temporary file, then rename), and every worker of
a (re)started group resumes from that file, as torchrun's documentation prescribes. When a
worker dies, torchrun's agent stops the group and starts all of it again.

Each worker appends JSON lines to --events: `{"event": "started"}` when the process starts (before
torch is imported), `{"event": "restored", "step": N}` after loading the checkpoint, and, on rank
0, `{"event": "step", "step": N}` after every step; all with "t" (Unix seconds), "rank" and
"attempt" (TORCHELASTIC_RESTART_COUNT). It also writes its pid to --state-dir/pid.RANK, so the
benchmark can kill it. (The options have names that no torchrun option starts with: torchrun
takes abbreviations of its own options even after the script's name.)

Usage (from bench/run_recovery.sh):
    python -m torch.distributed.run --standalone --nproc-per-node 3 --max-restarts 1 \\
        bench/reference_elastic.py --ddpm-config q.toml --unet-config unet.json --total-steps 60 \\
        --checkpoint-every 10 --state-dir /tmp/ref --events /tmp/ref/log.jsonl
"""

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_unet  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ddpm-config", required=True, help="TOML config (model, training, batch)")
    ap.add_argument("--unet-config", required=True, help="diffusers config.json")
    ap.add_argument("--total-steps", type=int, required=True, help="the run's last step")
    ap.add_argument("--checkpoint-every", type=int, required=True, help="checkpoint every this many steps")
    ap.add_argument("--state-dir", required=True, help="checkpoint and pid files")
    ap.add_argument("--events", required=True, help="JSON lines of events, appended")
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def log(event, **fields):
        line = json.dumps({"event": event, "t": time.time(), "rank": rank, "attempt": attempt, **fields})
        with open(args.events, "a") as f:
            f.write(line + "\n")

    log("started", t=STARTED)
    os.makedirs(args.state_dir, exist_ok=True)
    with open(os.path.join(args.state_dir, f"pid.{rank}"), "w") as f:
        f.write(str(os.getpid()))

    # The group's keys are prefixed by the restart count: with torch 2.11 a restarted gloo
    # group otherwise read the dead group's addresses from the agent's store and failed.
    store, _, _ = next(dist.rendezvous("env://"))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store),
                            rank=rank, world_size=world)
    import tomllib

    with open(args.ddpm_config, "rb") as f:
        global_batch = int(tomllib.load(f).get("train", {}).get("batch_size", 128))
    args.batch = global_batch // world + (1 if rank < global_batch % world else 0)
    args.config = args.ddpm_config  # what reference_unet.build reads
    args.threads = 1
    args.seed = rank
    _, train, data, sched, model, x = reference_unet.build(args)
    step = reference_unet.TrainStep(train, data, sched, model)

    path = os.path.join(args.state_dir, "checkpoint.pt")
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        step.ema.load_state_dict(state["ema"])
        step.opt.load_state_dict(state["optimizer"])
        step.step_n = state["step"]
    log("restored", step=step.step_n)
    step.model = torch.nn.parallel.DistributedDataParallel(model)

    while step.step_n < args.total_steps:
        step(x)
        if rank == 0:
            log("step", step=step.step_n)
            if step.step_n % args.checkpoint_every == 0:
                state = {"model": model.state_dict(), "ema": step.ema.state_dict(),
                         "optimizer": step.opt.state_dict(), "step": step.step_n}
                torch.save(state, path + ".tmp")
                os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
