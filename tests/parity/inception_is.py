#!/usr/bin/env python3
"""Parity fixtures for the Rust FID Inception-v3 (crates/ddpm-eval, `inception_v3`).

Run from the repository root:

    pip install torch==2.11.0 torchvision==0.26.0 pytorch-fid==0.3.0 numpy safetensors
    python tests/parity/inception_is.py

Writes into tests/parity/fixtures/:

* inception_is_weights.pth: a full state dict of pytorch-fid's FID Inception-v3
  (`pytorch_fid.inception.fid_inception_v3`, 1008-class head) saved with torch.save
  (zip format), filled with small deterministic weights instead of the TF ones. Every
  tensor is a strided view of ONE shared float32 storage, so torch.save writes only that
  storage (~0.3 MB instead of 96 MB). Running statistics are calibrated on the inputs
  below so activations stay O(1) through all 94 BatchNorms.
* inception_is_io.safetensors: `pool3` [2,2048] and `logits` [2,1008] of that model on the
  two inputs `x` of `inputs()` (a closed formula that the Rust test evaluates too), and
  `x_probe` = x[:, :, ::50, ::50] to check that both sides built the same input.
* inception_torch_save_{zip,legacy}.pth: one small state dict (views of a shared storage,
  a Parameter, float16, float64, int64, OrderedDict metadata) saved in the zip format and
  in the legacy (torch < 1.6) format, for the Rust torch.save reader.

The reference outputs come from pytorch-fid's own code: `fid_inception_v3()` (with its
weight download replaced by this file) for the logits and `pytorch_fid.inception.InceptionV3`
(block 3, no resize, no normalisation) for pool3. The script asserts that they agree with
each other and with the model the weights were built in.
"""

import collections
import os
import sys

import numpy as np
import torch
import torchvision
import pytorch_fid
import pytorch_fid.inception as pfi
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "fixtures")
N_IMAGES = 2

# Regions of the shared storage (float32 elements).
CONV_REGION = 24576  # conv weights: randn
FC_REGION = 12288  # fc.weight: 0.03 * randn, so that the logits are O(1)
GAMMA_REGION = 1024  # BatchNorm weights: uniform in [0.6, 1.4]
BETA_REGION = 1024  # BatchNorm biases and fc.bias: uniform in [0.3, 0.7] (see below)


def inputs():
    """The test images [2,3,299,299] in [-1, 1]; the Rust test evaluates the same formula in
    float64, in the same operation order, then rounds to float32."""
    n, c, h, w = np.meshgrid(
        np.arange(N_IMAGES, dtype=np.float64),
        np.arange(3, dtype=np.float64),
        np.arange(299, dtype=np.float64),
        np.arange(299, dtype=np.float64),
        indexing="ij",
    )
    x = 0.6 * np.sin(0.037 * h * (c + 1.0) + 0.051 * w + 1.3 * n) + 0.4 * np.cos(
        0.11 * (h - w) * (n + 1.0) + 0.5 * c
    )
    return torch.from_numpy(x.astype(np.float32))


def fid_inception_skeleton():
    """The body of pytorch_fid.inception.fid_inception_v3() without its weight download."""
    m = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    m.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    m.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    m.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    m.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    m.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    m.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    m.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    m.Mixed_7b = pfi.FIDInceptionE_1(1280)
    m.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return m.eval()


def shared_views(template, g):
    """A state dict with the names and shapes of `template`, every float tensor a view of one
    storage and every int64 counter a view of one int64 element."""
    bn_channels = sum(v.numel() for k, v in template.items() if k.endswith("running_mean"))
    sizes = [CONV_REGION, FC_REGION, GAMMA_REGION, BETA_REGION, bn_channels, bn_channels]
    starts = np.cumsum([0] + sizes).tolist()
    conv0, fc0, gamma0, beta0, mean0, var0, end = starts
    storage = torch.empty(end)
    storage[conv0:fc0] = torch.randn(CONV_REGION, generator=g)
    storage[fc0:gamma0] = 0.03 * torch.randn(FC_REGION, generator=g)
    storage[gamma0:beta0] = 0.6 + 0.8 * torch.rand(GAMMA_REGION, generator=g)
    # Positive biases keep ~70% of the units active. With zero-centred biases this random
    # network is three times more sensitive to float32 rounding (pool3 differs from a float64
    # forward by 1e-4 instead of 2e-5), too close to the tolerance of the Rust test.
    storage[beta0:mean0] = 0.3 + 0.4 * torch.rand(BETA_REGION, generator=g)
    storage[mean0:end] = 1.0  # overwritten by the calibration
    counter = torch.zeros(1, dtype=torch.int64)

    def rand_int(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=g))

    def weight_view(shape, region_start, region_len, row_strides):
        # Rows (output channels) are shifted windows of the region; within a row the layout is
        # contiguous, so each output channel sees distinct values.
        inner = int(np.prod(shape[1:]))
        s0 = rand_int(*row_strides)
        extent = (shape[0] - 1) * s0 + inner
        assert extent <= region_len, (shape, extent)
        offset = region_start + rand_int(0, region_len - extent)
        strides = [s0] + [int(np.prod(shape[i + 1 :])) for i in range(1, len(shape))]
        return storage.as_strided(shape, strides, offset)

    def vector_view(n, region_start, region_len):
        return storage.as_strided((n,), (1,), region_start + rand_int(0, region_len - n))

    out = collections.OrderedDict()
    next_stat = 0
    for name, t in template.items():
        shape = tuple(t.shape)
        if name.endswith("num_batches_tracked"):
            out[name] = counter.as_strided((), (), 0)
        elif name == "fc.weight":
            out[name] = weight_view(shape, fc0, FC_REGION, (3, 10))
        elif name == "fc.bias":
            out[name] = vector_view(shape[0], beta0, BETA_REGION)
        elif name.endswith("conv.weight"):
            out[name] = weight_view(shape, conv0, CONV_REGION, (3, 16))
        elif name.endswith("bn.weight"):
            out[name] = vector_view(shape[0], gamma0, GAMMA_REGION)
        elif name.endswith("bn.bias"):
            out[name] = vector_view(shape[0], beta0, BETA_REGION)
        elif name.endswith("bn.running_mean"):
            out[name] = storage.as_strided(shape, (1,), mean0 + next_stat)
        elif name.endswith("bn.running_var"):
            out[name] = storage.as_strided(shape, (1,), var0 + next_stat)
            next_stat += shape[0]
        else:
            raise AssertionError(f"unexpected state dict entry {name}")
        assert tuple(out[name].shape) == shape, name
    assert next_stat == bn_channels
    out._metadata = template._metadata
    return out, storage


def calibrate(model, views, x, g):
    """Sets every BatchNorm's running statistics, in forward order, from the statistics of its
    input on `x` (perturbed: mean +- 0.1 sd, variance x [0.7, 1.3]), in the model and in the
    shared storage."""
    hooks = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.BatchNorm2d):
            continue

        def hook(mod, args, mod_name=mod_name):
            (inp,) = args
            mean = inp.mean((0, 2, 3))
            var = inp.var((0, 2, 3), unbiased=False)
            c = mean.numel()
            rm = mean + 0.1 * var.sqrt() * (2 * torch.rand(c, generator=g) - 1)
            rv = var * (0.7 + 0.6 * torch.rand(c, generator=g)) + 1e-3
            for key, value in (("running_mean", rm), ("running_var", rv)):
                getattr(mod, key).copy_(value)
                views[f"{mod_name}.{key}"].copy_(value)

        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()


def save_io(tensors, name):
    path = os.path.join(OUT_DIR, name)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path)
    print(f"wrote {name}: {os.path.getsize(path)} bytes")


def make_inception():
    g = torch.Generator().manual_seed(20151205)
    x = inputs()
    model = fid_inception_skeleton()
    views, storage = shared_views(model.state_dict(), g)
    model.load_state_dict(views)
    calibrate(model, views, x, g)
    weights_path = os.path.join(OUT_DIR, "inception_is_weights.pth")
    torch.save(views, weights_path)
    print(f"wrote inception_is_weights.pth: {os.path.getsize(weights_path)} bytes "
          f"({storage.numel()} shared float32 elements, {len(views)} tensors)")

    # Reference outputs through pytorch-fid's own construction, from the saved file.
    pfi.load_state_dict_from_url = lambda *args, **kwargs: torch.load(weights_path)
    with torch.no_grad():
        full = pfi.fid_inception_v3().eval()
        logits = full(x)
        wrapper = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
        pool3 = wrapper(x)[0].flatten(1)
        torch.testing.assert_close(full.fc(pool3), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)
        f64 = fid_inception_skeleton().double()
        f64.load_state_dict(torch.load(weights_path))
        feats = {}
        f64.avgpool.register_forward_hook(lambda mod, args, out: feats.update(pool3=out.flatten(1)))
        logits64 = f64(x.double())
        pool64 = feats["pool3"]
    assert pool3.shape == (N_IMAGES, 2048) and logits.shape == (N_IMAGES, 1008)
    assert torch.isfinite(logits).all() and torch.isfinite(pool3).all()
    assert 0.1 < pool3.mean() < 10 and (pool3 > 0).float().mean() > 0.5, "pool3 degenerate"
    assert 0.3 < logits.std() < 30, f"logits degenerate: std {logits.std()}"
    assert (logits[0] - logits[1]).abs().max() > 0.1, "both images give the same logits"
    print(f"pool3: mean {pool3.mean():.3f}, max {pool3.max():.3f}; logits: std {logits.std():.3f}, "
          f"max |.| {logits.abs().max():.3f}; float32 vs float64: pool3 "
          f"{(pool3.double() - pool64).abs().max():.2e}, logits {(logits.double() - logits64).abs().max():.2e}")
    save_io({"pool3": pool3, "logits": logits, "x_probe": x[:, :, ::50, ::50]}, "inception_is_io.safetensors")


def make_torch_save_formats():
    base = torch.arange(40, dtype=torch.float32) / 8
    sd = collections.OrderedDict()
    sd["a.weight"] = base.as_strided((3, 4), (5, 1), 2)
    sd["a.bias"] = base[10:13]
    sd["a.t"] = base.as_strided((2, 3), (1, 2), 20)
    sd["p"] = torch.nn.Parameter(torch.full((2,), 0.5))
    sd["h"] = (torch.arange(6, dtype=torch.float16) - 2.5).reshape(2, 3)
    sd["d"] = torch.linspace(-1, 1, 5, dtype=torch.float64)
    sd["bn.num_batches_tracked"] = torch.tensor(7)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    for fmt, zip_format in (("zip", True), ("legacy", False)):
        name = f"inception_torch_save_{fmt}.pth"
        path = os.path.join(OUT_DIR, name)
        torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
        back = torch.load(path)
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        print(f"wrote {name}: {os.path.getsize(path)} bytes")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"pytorch-fid {pytorch_fid.__version__}, numpy {np.__version__}", file=sys.stderr)
    os.makedirs(OUT_DIR, exist_ok=True)
    make_inception()
    make_torch_save_formats()


if __name__ == "__main__":
    main()
