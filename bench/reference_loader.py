#!/usr/bin/env python3
"""Reference for `ddpm-bench loader`: a PyTorch DataLoader + PIL + torchvision pipeline
doing the loader's work on a folder of images, and the maker of the LSUN-like test set.

  make-data --photos DIR --out DIR [--n 512]
      Writes N lossy WebP images (quality 75) shaped like LSUN's exports: shorter side 256,
      longer side 256..400, cut from the real photos in --photos (random crops, flips and
      colour jitter, so no two are alike).

  run --dir DIR [--resolution 256] [--batch 32] [--workers 1] [--warmup 2] [--batches 20]
      DataLoader(num_workers=W) over the folder, each sample: PIL open + RGB, centre crop to
      a square, resize to R with LANCZOS (antialiased), RandomHorizontalFlip, ToTensor,
      Normalize to [-1, 1]. Prints one JSON line with images_per_second, like ddpm-bench.

Needs torch, torchvision and pillow.
"""

import argparse
import json
import os
import random
import sys
import time


def make_data(a):
    from PIL import Image, ImageEnhance

    photos = sorted(
        os.path.join(a.photos, f)
        for f in os.listdir(a.photos)
        if f.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    if not photos:
        sys.exit(f"no photos in {a.photos}")
    rng = random.Random(0)
    os.makedirs(a.out, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in photos]
    for i in range(a.n):
        img = sources[i % len(sources)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.7, 1.3))
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.8, 1.2))
        long_side = rng.randint(256, 400)
        size = (long_side, 256) if rng.random() < 0.7 else (256, long_side)
        crop.resize(size, Image.LANCZOS).save(
            os.path.join(a.out, f"{i:06d}.webp"), "WEBP", quality=75
        )
    print(json.dumps({"images": a.n, "dir": a.out}))


class Folder:
    def __init__(self, root, resolution):
        import torchvision.transforms as T

        self.files = sorted(
            os.path.join(root, f) for f in os.listdir(root) if f.endswith(".webp")
        )
        self.resolution = resolution
        self.tail = T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
            ]
        )

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.open(self.files[i]).convert("RGB")
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        if s != self.resolution:
            img = img.resize((self.resolution, self.resolution), Image.LANCZOS)
        return self.tail(img)


def worker_init(_):
    import torch

    torch.set_num_threads(1)


def run(a):
    import torch

    torch.set_num_threads(1)
    ds = Folder(a.dir, a.resolution)
    total = a.warmup + a.batches
    # Sample with replacement so the run never ends an epoch mid-measurement.
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=total * a.batch)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=a.batch,
        sampler=sampler,
        num_workers=a.workers,
        worker_init_fn=worker_init if a.workers > 0 else None,
        drop_last=True,
    )
    it = iter(dl)
    for _ in range(a.warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(a.batches):
        b = next(it)
        assert tuple(b.shape) == (a.batch, 3, a.resolution, a.resolution), b.shape
        n += b.shape[0]
    secs = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "impl": "pytorch-dataloader",
                "bench": "loader",
                "threads": a.workers,
                "batch": a.batch,
                "resolution": a.resolution,
                "dataset_images": len(ds),
                "images": n,
                "seconds": secs,
                "images_per_second": n / secs,
            }
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-data")
    m.add_argument("--photos", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=512)
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--resolution", type=int, default=256)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--batches", type=int, default=20)
    a = p.parse_args()
    make_data(a) if a.cmd == "make-data" else run(a)


if __name__ == "__main__":
    main()
