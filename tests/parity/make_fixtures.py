#!/usr/bin/env python3
"""Generate golden parity fixtures for the Rust DDPM reimplementation.

Run from the repository root:

    python tests/parity/make_fixtures.py

Writes everything into tests/parity/fixtures/. The script is deterministic:
fixed seeds, deterministic algorithms, a single CPU thread, and stable JSON
serialisation, so a rerun produces byte-identical files (on the same
torch/diffusers/numpy versions, see requirements.txt).

References:
  * diffusers 0.35.1 (UNet2DModel, DDPMScheduler, DDIMScheduler).
  * Ho et al. 2020 official TF code (hojonathanho/diffusion,
    diffusion_utils_2.py / nn.py) for the float64 numpy transcriptions.
"""

import json
import math
import os
import sys

import numpy as np
import torch

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

EXPECTED_TORCH = "2.11.0"
EXPECTED_DIFFUSERS = "0.35.1"

# Tolerances recommended for the Rust tests (see README.md). Where a
# tolerance is meant to also admit an independent float64 implementation,
# this script asserts that the float64 reference passes it.
TOL_UNET = dict(atol=1e-4, rtol=1e-4)
TOL_SCHED_F32 = dict(atol=1e-6, rtol=1e-5)
TOL_SCHED_VAR_F32 = dict(atol=1e-12, rtol=1e-3)
TOL_SCHED_F64 = dict(atol=1e-15, rtol=1e-12)
TOL_DDPM_STEP = dict(atol=2e-4, rtol=1e-4)
TOL_DDIM_STEP = dict(atol=1e-5, rtol=1e-4)
TOL_DGL_F64 = dict(atol=1e-5, rtol=1e-7)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "fixtures")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def setup_determinism():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    if not torch.__version__.startswith(EXPECTED_TORCH):
        print(f"WARNING: torch {torch.__version__} != {EXPECTED_TORCH}; bytes may differ", file=sys.stderr)
    if diffusers.__version__ != EXPECTED_DIFFUSERS:
        print(
            f"WARNING: diffusers {diffusers.__version__} != {EXPECTED_DIFFUSERS}; bytes may differ",
            file=sys.stderr,
        )


def save(tensors, name):
    out = {}
    for k, v in tensors.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = v.detach().cpu().contiguous().clone()
    path = os.path.join(OUT_DIR, name)
    save_file(out, path)
    print(f"wrote {name}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def jsonable(v):
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    return v


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


# --------------------------------------------------------------------------
# 1. UNet fixtures
# --------------------------------------------------------------------------
UNET_COMMON = dict(
    sample_size=16,
    in_channels=3,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,
    act_fn="silu",
)

UNET_SMALL = dict(
    UNET_COMMON,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
)

UNET_SMALL3 = dict(
    UNET_COMMON,
    out_channels=6,
    block_out_channels=(32, 32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
)


def make_unet(prefix, kwargs, perturb_seed, input_seed, timesteps):
    torch.manual_seed(0)
    model = UNet2DModel(**kwargs)
    model.eval()

    # Perturb every parameter (incl. GroupNorm weight/bias, zero-initialised
    # output convs, biases) so nothing is trivially 0 or 1.
    torch.manual_seed(perturb_seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            # Round to float16 so the weights can be stored at half the size; the reference
            # output below is computed in float32 from exactly these (rounded) values.
            p.copy_(p.half().float())

    sd = model.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert len(list(model.named_buffers())) == 0
    # Stored as float16 (exactly representable, see above): loaders must cast to float32.
    save({k: v.half() for k, v in sd.items()}, f"{prefix}_weights.safetensors")

    cfg = jsonable(dict(model.config))
    # `_use_default_values` is built from a set -> order depends on
    # PYTHONHASHSEED; sort it so the JSON is byte-stable.
    if "_use_default_values" in cfg:
        cfg["_use_default_values"] = sorted(cfg["_use_default_values"])
    with open(os.path.join(OUT_DIR, f"{prefix}_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {prefix}_config.json")

    x = torch.randn(4, 3, 16, 16, generator=gen(input_seed), dtype=torch.float32)
    t = torch.tensor(timesteps, dtype=torch.int64)
    with torch.no_grad():
        out = model(x, t).sample
    assert out.dtype == torch.float32 and out.shape == (4, kwargs["out_channels"], 16, 16)

    # Informational: how far is the float32 output from a float64 forward pass?
    with torch.no_grad():
        m64 = UNet2DModel(**kwargs)
        m64.load_state_dict(sd)
        m64 = m64.double().eval()
        out64 = m64(x.double(), t).sample
    assert torch.allclose(out64, out.double(), **TOL_UNET), prefix
    d = (out.double() - out64).abs()
    print(
        f"  {prefix}: |out| max={out.abs().max().item():.4f} mean={out.abs().mean().item():.4f}; "
        f"f32-vs-f64 max abs diff={d.max().item():.3e}, max rel={(d / out64.abs().clamp_min(1e-3)).max().item():.3e}"
    )

    save({"x": x, "t": t, "out": out}, f"{prefix}_io.safetensors")


# --------------------------------------------------------------------------
# 2. Scheduler tables
# --------------------------------------------------------------------------
def linear_sched(**kw):
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kw
    )


def official_tables_f64():
    """Numpy float64 transcription of GaussianDiffusion2.__init__ (official TF code)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    return dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        posterior_mean_coef1=posterior_mean_coef1,
        posterior_mean_coef2=posterior_mean_coef2,
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
    )


def make_scheduler():
    lin = linear_sched()
    cos = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    off = official_tables_f64()

    var_small = torch.stack([lin._get_variance(t, variance_type="fixed_small") for t in range(1000)])
    var_large = torch.stack([lin._get_variance(t, variance_type="fixed_large") for t in range(1000)])
    assert var_small.dtype == torch.float32 and var_large.dtype == torch.float32

    d = {
        "linear_betas_f32": lin.betas.to(torch.float32),
        "linear_alphas_cumprod_f32": lin.alphas_cumprod.to(torch.float32),
        "linear_betas_f64": off["betas"],
        "linear_alphas_cumprod_f64": off["alphas_cumprod"],
        "cosine_betas_f32": cos.betas.to(torch.float32),
        "cosine_alphas_cumprod_f32": cos.alphas_cumprod.to(torch.float32),
        "var_fixed_small_f32": var_small,
        "var_fixed_large_f32": var_large,
        "posterior_mean_coef1_f64": off["posterior_mean_coef1"],
        "posterior_mean_coef2_f64": off["posterior_mean_coef2"],
        "posterior_variance_f64": off["posterior_variance"],
        "posterior_log_variance_clipped_f64": off["posterior_log_variance_clipped"],
    }
    for k, v in d.items():
        want = np.float64 if k.endswith("_f64") else torch.float32
        assert (v.dtype == want) if isinstance(v, np.ndarray) else (v.dtype == want), k

    # --- cross-checks backing the README tolerances ---
    def close(a, b, tol, what, sl=slice(None)):
        a = torch.as_tensor(a).double()[sl]
        b = torch.as_tensor(b).double()[sl]
        assert torch.allclose(a, b, **tol), (what, (a - b).abs().max().item())

    # f64 tables recomputed with torch float64 ops (what a libtorch f64 port would do)
    betas_t = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    acp_t = torch.cumprod(1.0 - betas_t, dim=0)
    acp_prev_t = torch.cat([torch.ones(1, dtype=torch.float64), acp_t[:-1]])
    pv_t = betas_t * (1.0 - acp_prev_t) / (1.0 - acp_t)
    close(betas_t, off["betas"], TOL_SCHED_F64, "betas f64")
    close(acp_t, off["alphas_cumprod"], TOL_SCHED_F64, "acp f64")
    close(pv_t, off["posterior_variance"], TOL_SCHED_F64, "posterior_variance f64")
    close(betas_t * acp_prev_t.sqrt() / (1.0 - acp_t), off["posterior_mean_coef1"], TOL_SCHED_F64, "coef1")
    close((1.0 - acp_prev_t) * (1.0 - betas_t).sqrt() / (1.0 - acp_t), off["posterior_mean_coef2"], TOL_SCHED_F64, "coef2")
    close(torch.log(torch.cat([pv_t[1:2], pv_t[1:]])), off["posterior_log_variance_clipped"], TOL_SCHED_F64, "logvar")
    # f32 tables vs float64 references
    close(d["linear_betas_f32"], off["betas"], TOL_SCHED_F32, "linear betas f32")
    close(d["linear_alphas_cumprod_f32"], off["alphas_cumprod"], TOL_SCHED_F32, "linear acp f32")

    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    cos_betas64 = np.array([min(1 - abar((i + 1) / 1000) / abar(i / 1000), 0.999) for i in range(1000)])
    close(d["cosine_betas_f32"], cos_betas64, TOL_SCHED_F32, "cosine betas f32")
    close(d["cosine_alphas_cumprod_f32"], np.cumprod(1.0 - cos_betas64), TOL_SCHED_F32, "cosine acp f32")
    close(var_small, off["posterior_variance"], TOL_SCHED_VAR_F32, "fixed_small", slice(1, None))
    assert var_small[0].item() == np.float32(1e-20)  # diffusers clamps the t=0 variance (0) to 1e-20
    close(var_large, off["betas"], TOL_SCHED_VAR_F32, "fixed_large")

    # Informational diagnostics
    b32_vs_64 = np.abs(lin.betas.double().numpy() - off["betas"]).max()
    acp32_vs_64 = np.abs(lin.alphas_cumprod.double().numpy() - off["alphas_cumprod"]).max()
    vs_vs_64 = np.abs(var_small.double().numpy()[1:] - off["posterior_variance"][1:])
    print(
        f"  linear f32 vs f64: betas max abs diff {b32_vs_64:.3e}; alphas_cumprod max abs diff {acp32_vs_64:.3e}; "
        f"fixed_small(t>=1) vs posterior_variance max rel diff "
        f"{(vs_vs_64 / off['posterior_variance'][1:]).max():.3e}; "
        f"var_fixed_small[0]={var_small[0].item():.3e}; var_fixed_large[0]={var_large[0].item():.6e} "
        f"(betas[0]={lin.betas[0].item():.6e})"
    )
    save(d, "scheduler.safetensors")


# --------------------------------------------------------------------------
# 3. DDPM single reverse step
# --------------------------------------------------------------------------
def ddpm_step_reference(sched, model_output, t, x, noise):
    """Re-implementation of DDPMScheduler.step (same float32 op order) with explicit noise."""
    acp = sched.alphas_cumprod
    a_t = acp[t]
    a_prev = acp[t - 1] if t - 1 >= 0 else sched.one
    beta_prod_t = 1 - a_t
    beta_prod_prev = 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    if sched.config.prediction_type == "epsilon":
        x0 = (x - beta_prod_t ** 0.5 * model_output) / a_t ** 0.5
    else:
        x0 = model_output
    x0 = x0.clamp(-1.0, 1.0)
    c1 = (a_prev ** 0.5 * cur_beta) / beta_prod_t
    c2 = cur_alpha ** 0.5 * beta_prod_prev / beta_prod_t
    mean = c1 * x0 + c2 * x
    if t > 0:
        var = sched._get_variance(t)
        return mean + (var ** 0.5) * noise, x0, mean, var
    return mean, x0, mean, None


def make_ddpm_step():
    off = official_tables_f64()
    d = {}
    seed = 1000
    for var_type in ("fixed_small", "fixed_large"):
        for pred in ("epsilon", "sample"):
            sched = linear_sched(variance_type=var_type, prediction_type=pred, clip_sample=True)
            for t in (999, 500, 1, 0):
                seed += 1
                key = f"{var_type}_{pred}_t{t}"
                g_in = gen(seed * 7 + 3)
                x = torch.randn(2, 3, 8, 8, generator=g_in, dtype=torch.float32)
                model_output = torch.randn(2, 3, 8, 8, generator=g_in, dtype=torch.float32)
                noise = randn_tensor((2, 3, 8, 8), generator=gen(seed))
                assert noise.dtype == torch.float32
                res = sched.step(model_output, t, x, generator=gen(seed))
                prev, x0 = res.prev_sample, res.pred_original_sample
                assert prev.dtype == torch.float32 and x0.dtype == torch.float32

                # --- verify the noise the scheduler drew equals the stored noise ---
                ref_prev, ref_x0, ref_mean, ref_var = ddpm_step_reference(sched, model_output, t, x, noise)
                assert torch.equal(ref_x0, x0), key
                assert torch.equal(ref_prev, prev), f"{key}: scheduler noise != stored noise (bitwise)"
                if t > 0:
                    # invert: recovered noise must match stored noise
                    recovered = (prev - ref_mean) / ref_var ** 0.5
                    assert torch.allclose(recovered, noise, atol=1e-4, rtol=1e-4), key
                    # with a different generator seed the result must differ (noise really used)
                    other = sched.step(model_output, t, x, generator=gen(seed + 100000)).prev_sample
                    assert not torch.allclose(other, prev), key
                else:
                    assert torch.equal(prev, ref_mean), key

                # --- independent float64 check against the official formulas ---
                xd, md, nd = x.double(), model_output.double(), noise.double()
                acp = off["alphas_cumprod"][t]
                if pred == "epsilon":
                    x0d = (xd - math.sqrt(1 - acp) * md) / math.sqrt(acp)
                else:
                    x0d = md
                x0d = x0d.clamp(-1, 1)
                meand = off["posterior_mean_coef1"][t] * x0d + off["posterior_mean_coef2"][t] * xd
                if var_type == "fixed_small":
                    logv = off["posterior_log_variance_clipped"][t]
                else:  # official fixedlarge: log(append(posterior_variance[1], betas[1:]))
                    logv = math.log(off["posterior_variance"][1] if t == 0 else off["betas"][t])
                prevd = meand + (0.0 if t == 0 else 1.0) * math.exp(0.5 * logv) * nd
                err = (prev.double() - prevd).abs().max().item()
                assert torch.allclose(prevd, prev.double(), **TOL_DDPM_STEP), (key, err)
                assert torch.allclose(x0d, x0.double(), **TOL_DDPM_STEP), key

                d[f"{key}_x"] = x
                d[f"{key}_model_output"] = model_output
                d[f"{key}_noise"] = noise
                d[f"{key}_prev"] = prev
                d[f"{key}_pred_x0"] = x0
                # The official float64 formulas on the same inputs: diffusers' float32
                # coefficients lose precision at small t (1 - alphas_cumprod cancels).
                d[f"{key}_prev_f64"] = prevd
                print(f"  ddpm {key}: noise check OK; |diffusers f32 - official f64| max={err:.2e}")
    save(d, "ddpm_step.safetensors")


# --------------------------------------------------------------------------
# 4. DDIM single step
# --------------------------------------------------------------------------
def make_ddim_step():
    off = official_tables_f64()
    d = {}
    timesteps = None
    seed = 5000
    for clip in (False, True):
        sched = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
            clip_sample=clip,
        )
        sched.set_timesteps(50)
        ts = sched.timesteps.to(torch.int64).clone()
        if timesteps is None:
            timesteps = ts
        assert torch.equal(ts, timesteps)
        chosen = (int(ts[0]), int(ts[len(ts) // 2]), int(ts[-1]))
        assert chosen[-1] == 0
        for eta, eta_name in ((0.0, "0"), (0.5, "05")):
            for t in chosen:
                seed += 1
                key = f"ddim_clip{int(clip)}_eta{eta_name}_t{t}"
                g_in = gen(seed * 7 + 3)
                x = torch.randn(2, 3, 8, 8, generator=g_in, dtype=torch.float32)
                model_output = torch.randn(2, 3, 8, 8, generator=g_in, dtype=torch.float32)
                noise = torch.randn(2, 3, 8, 8, generator=g_in, dtype=torch.float32)
                prev = sched.step(
                    model_output, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=False
                ).prev_sample
                assert prev.dtype == torch.float32
                if eta == 0.0:
                    # noise must be ignored when eta == 0
                    assert torch.equal(
                        prev,
                        sched.step(model_output, t, x, eta=eta, variance_noise=torch.zeros_like(noise)).prev_sample,
                    ), key

                # independent float64 check (DDIM paper eq. 12/16 with official-style f64 tables)
                acp64 = off["alphas_cumprod"]
                a_t = acp64[t]
                a_prev = acp64[t - 20] if t - 20 >= 0 else 1.0
                xd, ed, nd = x.double(), model_output.double(), noise.double()
                x0d = (xd - math.sqrt(1 - a_t) * ed) / math.sqrt(a_t)
                if clip:
                    x0d = x0d.clamp(-1, 1)
                sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
                prevd = math.sqrt(a_prev) * x0d + math.sqrt(1 - a_prev - sigma**2) * ed + sigma * nd
                err = (prev.double() - prevd).abs().max().item()
                assert torch.allclose(prevd, prev.double(), **TOL_DDIM_STEP), (key, err)
                print(f"  ddim {key}: |diffusers f32 - f64 formula| max={err:.2e}")

                d[f"{key}_x"] = x
                d[f"{key}_model_output"] = model_output
                d[f"{key}_noise"] = noise
                d[f"{key}_prev"] = prev
    d["timesteps"] = timesteps
    print(f"  ddim timesteps: {timesteps.tolist()[:3]} ... {timesteps.tolist()[-3:]} (len {len(timesteps)})")
    save(d, "ddim_step.safetensors")


# --------------------------------------------------------------------------
# 5. Likelihood helpers (float64 numpy transcriptions)
# --------------------------------------------------------------------------
def normal_kl_np(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2)
    )


def approx_std_normal_cdf_np(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))


def discretized_gaussian_log_likelihood_np(x, means, log_scales):
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_std_normal_cdf_np(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_std_normal_cdf_np(min_in)
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return np.where(
        x < -0.999,
        log_cdf_plus,
        np.where(x > 0.999, log_one_minus_cdf_min, np.log(np.maximum(cdf_delta, 1e-12))),
    )


def make_likelihood():
    g = gen(9001)
    kl_mean1 = torch.randn(64, generator=g, dtype=torch.float32)
    kl_logvar1 = -6.0 + 7.0 * torch.rand(64, generator=g, dtype=torch.float32)
    kl_mean2 = torch.randn(64, generator=g, dtype=torch.float32)
    kl_logvar2 = -6.0 + 7.0 * torch.rand(64, generator=g, dtype=torch.float32)
    kl_out = normal_kl_np(
        kl_mean1.double().numpy(), kl_logvar1.double().numpy(), kl_mean2.double().numpy(), kl_logvar2.double().numpy()
    )
    assert np.all(kl_out >= -1e-12)

    dgl_x = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    assert dgl_x[0].item() == -1.0 and dgl_x[-1].item() == 1.0
    dgl_means = (dgl_x + 0.05 * torch.randn(256, generator=g, dtype=torch.float32)).clamp(-1.2, 1.2)
    dgl_log_scales = -5.0 + 5.0 * torch.rand(256, generator=g, dtype=torch.float32)
    dgl_out = discretized_gaussian_log_likelihood_np(
        dgl_x.double().numpy(), dgl_means.double().numpy(), dgl_log_scales.double().numpy()
    )
    assert np.all(np.isfinite(dgl_out)) and np.all(dgl_out <= 0)

    # Cross-check with a torch float64 implementation (different tanh/exp/log
    # kernels). A few entries have cdf_delta ~1e-12..1e-9 (catastrophic
    # cancellation), so agreement is ~1e-6 absolute, not ~1e-15.
    def dgl_torch(x, m, ls):
        def a(z):
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

        c = x - m
        inv = torch.exp(-ls)
        cp = a(inv * (c + 1.0 / 255.0))
        cm = a(inv * (c - 1.0 / 255.0))
        return torch.where(
            x < -0.999,
            torch.log(cp.clamp_min(1e-12)),
            torch.where(x > 0.999, torch.log((1.0 - cm).clamp_min(1e-12)), torch.log((cp - cm).clamp_min(1e-12))),
        )

    dgl_t = dgl_torch(dgl_x.double(), dgl_means.double(), dgl_log_scales.double())
    assert torch.allclose(dgl_t, torch.from_numpy(dgl_out), **TOL_DGL_F64)
    dgl_t32 = dgl_torch(dgl_x, dgl_means, dgl_log_scales).double()
    print(
        f"  dgl: torch-f64 vs numpy-f64 max abs {(dgl_t - torch.from_numpy(dgl_out)).abs().max().item():.2e}; "
        f"torch-f32 vs numpy-f64 max abs {(dgl_t32 - torch.from_numpy(dgl_out)).abs().max().item():.2e}"
    )
    n_floor = int(np.sum(dgl_out <= np.log(1e-12) + 1e-9))
    print(
        f"  likelihood: kl range [{kl_out.min():.3e}, {kl_out.max():.3e}]; dgl range "
        f"[{dgl_out.min():.3f}, {dgl_out.max():.3e}], {n_floor} entries at the 1e-12 floor"
    )
    save(
        {
            "kl_mean1": kl_mean1,
            "kl_logvar1": kl_logvar1,
            "kl_mean2": kl_mean2,
            "kl_logvar2": kl_logvar2,
            "kl_out": kl_out,
            "dgl_x": dgl_x,
            "dgl_means": dgl_means,
            "dgl_log_scales": dgl_log_scales,
            "dgl_out": dgl_out,
        },
        "likelihood.safetensors",
    )


def main():
    setup_determinism()
    os.makedirs(OUT_DIR, exist_ok=True)
    make_unet("unet_small", UNET_SMALL, perturb_seed=1, input_seed=2, timesteps=[0, 1, 500, 999])
    make_unet("unet_small3", UNET_SMALL3, perturb_seed=11, input_seed=12, timesteps=[3, 250, 750, 998])
    make_scheduler()
    make_ddpm_step()
    make_ddim_step()
    make_likelihood()
    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR))
    print(f"total fixture size: {total} bytes")


if __name__ == "__main__":
    main()
