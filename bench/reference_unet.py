#!/usr/bin/env python3
"""PyTorch eager reference for `ddpm-bench`: the same benchmarks on diffusers' UNet2DModel.

The U-Net is built from the diffusers config.json that `ddpm-bench diffusers-config --config F`
prints (so both sides describe one architecture); the training hyper-parameters, schedule and
default batch come from the same TOML config. Benchmarks (one JSON line on stdout, the same
fields as `ddpm-bench`):

* train-step:  random flip, t ~ U{0..T-1}, noise, forward, eps-MSE loss, zero_grad, backward,
               clip_grad_norm_(grad_clip), torch.optim.Adam (defaults otherwise), linear LR
               warmup, EMA via torch._foreach_lerp_.
* sample-step: one ancestral step with one network (no EMA copy or optimizer state): forward
               under torch.no_grad() in eval mode, x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) clipped to [-1, 1],
               posterior mean, plus exp(0.5 log sigma^2) z (fixed-large or fixed-small variance).
* train-phases: the training step timed in segments: forward + loss, backward, and the update
               (clip, Adam, EMA), each also reported separately, with minor page faults.
* checkpoint:  after one training step, the usual PyTorch checkpoint of the full state:
               torch.save({model, ema, optimizer, step}) to a file in --dir, then fsync. It runs
               on the training thread, so all of it is a stall (compare with the stall_s and
               commit_s of `ddpm-bench checkpoint`).

Usage:
    python bench/reference_unet.py train-step --config configs/cifar10.toml \
        --unet-config /tmp/cifar10.diffusers.json --batch 8 --threads 2 --warmup 2 --iters 5
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import tomllib

import torch


def peak_rss_mib():
    """Peak resident set size (VmHWM) of this process in MiB, as ddpm-bench reads it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Schedule:
    """The linear (or cosine) schedule in float64, as crates/ddpm-diffusion computes it."""

    def __init__(self, d):
        n = int(d.get("num_timesteps", 1000))
        kind = d.get("schedule", "linear")
        if kind == "linear":
            betas = torch.linspace(d.get("beta_start", 1e-4), d.get("beta_end", 0.02), n, dtype=torch.float64)
        elif kind == "cosine":
            f = lambda t: math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)], dtype=torch.float64)
        else:
            raise SystemExit(f"schedule {kind!r} not supported by the reference")
        acp = torch.cumprod(1 - betas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        post_var = betas * (1 - acp_prev) / (1 - acp)
        self.n = n
        self.sqrt_acp = acp.sqrt()
        self.sqrt_1m_acp = (1 - acp).sqrt()
        self.sqrt_recip_acp = (1 / acp).sqrt()
        self.sqrt_recipm1_acp = (1 / acp - 1).sqrt()
        self.coef1 = betas * acp_prev.sqrt() / (1 - acp)
        self.coef2 = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)
        if d.get("model_var_type", "fixedlarge") == "fixedsmall":
            self.log_var = torch.cat([post_var[1:2], post_var[1:]]).log()
        else:
            self.log_var = torch.cat([post_var[1:2], betas[1:]]).log()

    @staticmethod
    def extract(a, t, like):
        """a[t] (float64) cast to like's dtype, shaped [B, 1, 1, 1]."""
        return a.index_select(0, t).to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def build(args):
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    with open(args.unet_config) as f:
        unet_cfg = json.load(f)
    from diffusers import UNet2DModel

    d = cfg.get("diffusion", {})
    if d.get("model_mean_type", "eps") != "eps" or d.get("loss_type", "mse") != "mse":
        raise SystemExit("the reference implements eps prediction with the mse loss only")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = cfg.get("train", {})
    data = cfg.get("data", {})
    batch = args.batch or int(train.get("batch_size", 128))
    c, r = int(data.get("channels", 3)), int(data.get("resolution", 32))
    x = torch.rand(batch, c, r, r) * 2 - 1
    model = UNet2DModel.from_config(unet_cfg)
    return cfg, train, data, Schedule(d), model, x


TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_ticks():
    """(busy clock ticks of the whole machine, clock ticks of this process), as ddpm-bench."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        machine = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return machine, int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return 0, 0


def minor_faults():
    """Minor page faults of this process so far (/proc/self/stat field 10), 0 if unreadable."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def time_steps(args, step):
    """Runs step() warmup + iters times; returns the timed seconds of the last iters and the
    share of the machine's CPUs other processes used meanwhile."""
    for _ in range(args.warmup):
        step()
    times = []
    m0, o0 = cpu_ticks()
    wall = time.perf_counter()
    for _ in range(args.iters):
        s = time.perf_counter()
        step()
        times.append(time.perf_counter() - s)
    wall = time.perf_counter() - wall
    m1, o1 = cpu_ticks()
    other = None
    if m1 > 0:
        other = max(((m1 - m0) - (o1 - o0)) / TICKS_PER_S / (wall * (os.cpu_count() or 1)), 0.0)
    return times, other


def report(args, bench, cfg, batch, params, timing):
    times, other = timing
    med = statistics.median(times)
    return {
        "impl": "pytorch",
        "bench": bench,
        "config": cfg.get("run", {}).get("name", "?"),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "iters": args.iters,
        "params": params,
        "median_s": med,
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "images_per_s": batch / med,
        "peak_rss_mib": peak_rss_mib(),
        "other_cpu_frac": other,
        "times_s": times,
        "torch": torch.__version__,
    }


class TrainStep:
    """One training step split into forward + loss, backward and update, as the Rust trainer."""

    def __init__(self, train, data, sched, model):
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema_params = list(self.ema.parameters())
        self.opt = torch.optim.Adam(
            self.params,
            lr=float(train.get("lr", 2e-4)),
            betas=(float(train.get("adam_beta1", 0.9)), float(train.get("adam_beta2", 0.999))),
            eps=float(train.get("adam_eps", 1e-8)),
        )
        self.lr = float(train.get("lr", 2e-4))
        self.warmup = int(train.get("warmup_steps", 0))
        self.clip = float(train.get("grad_clip", 1.0))
        self.ema_weight = 1.0 - float(train.get("ema_decay", 0.9999))
        self.flip = bool(data.get("random_flip", True))
        self.sched = sched
        self.step_n = 0

    def forward_loss(self, x0):
        b = x0.shape[0]
        if self.flip:
            flip = (torch.rand(b) < 0.5).view(b, 1, 1, 1)
            x0 = torch.where(flip, x0.flip(3), x0)
        t = torch.randint(0, self.sched.n, (b,))
        noise = torch.randn_like(x0)
        s = self.sched
        x_t = s.extract(s.sqrt_acp, t, x0) * x0 + s.extract(s.sqrt_1m_acp, t, x0) * noise
        out = self.model(x_t, t, return_dict=False)[0]
        return (noise - out).square().mean(dim=(1, 2, 3)).mean()

    def backward(self, loss):
        self.opt.zero_grad()
        loss.backward()

    def clip_grads(self):
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)

    def adam(self):
        lr = self.lr * min((self.step_n + 1) / self.warmup, 1.0) if self.warmup > 0 else self.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.step_n += 1

    def ema_update(self):
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, self.ema_weight)

    def __call__(self, x0):
        loss = self.forward_loss(x0)
        self.backward(loss)
        self.clip_grads()
        self.adam()
        self.ema_update()
        return loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", choices=["train-step", "sample-step", "train-phases", "checkpoint"])
    ap.add_argument("--config", required=True, help="TOML config (schedule, training hyper-parameters)")
    ap.add_argument("--unet-config", required=True, help="diffusers config.json (ddpm-bench diffusers-config)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: the config's train.batch_size)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp", help="checkpoint: directory to write to")
    args = ap.parse_args()
    if args.iters < 1:
        raise SystemExit("--iters must be at least 1")

    cfg, train, data, sched, model, x = build(args)
    batch = x.shape[0]
    params = sum(p.numel() for p in model.parameters())

    if args.bench == "checkpoint":
        step = TrainStep(train, data, sched, model)
        step(x)  # Adam has its moments after one step
        sizes = []

        def one():
            path = os.path.join(args.dir, "reference-checkpoint.pt")
            state = {"model": step.model.state_dict(), "ema": step.ema.state_dict(),
                     "optimizer": step.opt.state_dict(), "step": step.step_n}
            torch.save(state, path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            sizes.append(os.path.getsize(path))
            os.remove(path)

        out = report(args, "checkpoint", cfg, batch, params, time_steps(args, one))
        out["bytes"] = sizes[-1]
    elif args.bench == "train-step":
        step = TrainStep(train, data, sched, model)

        def one():
            loss = step(x)
            if not math.isfinite(loss):
                raise SystemExit(f"non-finite loss {loss}")

        out = report(args, "train-step", cfg, batch, params, time_steps(args, one))
    elif args.bench == "sample-step":
        # What a sampler holds: one network (the EMA weights) in eval mode, no optimizer state.
        ema = model.eval().requires_grad_(False)
        t = torch.full((batch,), sched.n // 2, dtype=torch.int64)
        clip = bool(cfg.get("sample", {}).get("clip_denoised", True))

        def one():
            with torch.no_grad():
                eps = ema(x, t, return_dict=False)[0]
                x0 = sched.extract(sched.sqrt_recip_acp, t, x) * x - sched.extract(sched.sqrt_recipm1_acp, t, x) * eps
                if clip:
                    x0 = x0.clamp(-1, 1)
                mean = sched.extract(sched.coef1, t, x) * x0 + sched.extract(sched.coef2, t, x) * x
                noise = torch.randn_like(x)
                mask = (t != 0).to(x.dtype).view(-1, 1, 1, 1)
                x_prev = mean + mask * (sched.extract(sched.log_var, t, x) * 0.5).exp() * noise
                v = x_prev[0, 0, 0, 0].item()
            if not math.isfinite(v):
                raise SystemExit(f"non-finite sample {v}")

        out = report(args, "sample-step", cfg, batch, params, time_steps(args, one))
    else:
        step = TrainStep(train, data, sched, model)
        names = ["forward_loss", "backward", "clip", "adam", "ema"]
        seg = {k: [] for k in names}
        faults = {k: 0 for k in names}
        i = 0

        def one():
            nonlocal i
            marks = [(time.perf_counter(), minor_faults())]
            loss = step.forward_loss(x)
            loss.item()
            marks.append((time.perf_counter(), minor_faults()))
            step.backward(loss)
            marks.append((time.perf_counter(), minor_faults()))
            step.clip_grads()
            marks.append((time.perf_counter(), minor_faults()))
            step.adam()
            marks.append((time.perf_counter(), minor_faults()))
            step.ema_update()
            marks.append((time.perf_counter(), minor_faults()))
            if i >= args.warmup:
                for k, (t0, f0), (t1, f1) in zip(names, marks, marks[1:]):
                    seg[k].append(t1 - t0)
                    faults[k] += f1 - f0
            i += 1

        timing = time_steps(args, one)
        out = report(args, "train-phases", cfg, batch, params, timing)
        med = {k: statistics.median(v) for k, v in seg.items()}
        med["update_clip_adam_ema"] = statistics.median(
            [a + b + c for a, b, c in zip(seg["clip"], seg["adam"], seg["ema"])]
        )
        med["full_step"] = statistics.median(timing[0])
        out["minor_faults_per_step"] = {k: v // args.iters for k, v in faults.items()}
        out["phases_median_s"] = med
    print(json.dumps(out, sort_keys=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
