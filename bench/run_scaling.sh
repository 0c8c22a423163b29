#!/usr/bin/env bash
# Weak scaling on this host (issue 4): `ddpm launch --workers 2` with one intra-op thread per
# worker and a global batch of 2B, against `ddpm launch --workers 1` with one thread and
# batch B: the same per-worker batch and model (configs/quickstart.toml on Fashion-MNIST).
# Efficiency = images/s with 2 workers / (2 x images/s with 1). `ddpm train` (one process,
# no coordinator or ring) at batch B, 1 thread, is measured too. When PYTHON has torch and
# diffusers, PyTorch DistributedDataParallel (gloo, same U-Net as diffusers' UNet2DModel,
# same batches and threads; bench/reference_ddp.py) is measured in the same rounds.
# Rounds alternate the configurations; the summary is the median of each.
#
# Usage: bash bench/run_scaling.sh
# Environment (all optional):
#   B        per-worker batch                                   (default 32)
#   STEPS    steps per run; images/s is the median of the log windows after step SKIP
#            (default 80, SKIP 20, windows of 10 steps)
#   ROUNDS   alternations                                       (default 3)
#   PYTHON   interpreter with torch + diffusers for the DDP reference (skipped if absent)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-32}
STEPS=${STEPS:-80}
SKIP=${SKIP:-20}
ROUNDS=${ROUNDS:-3}
PYTHON=${PYTHON:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

make --quiet libtorch data >&2
cargo build --release -p ddpm-cli -p ddpm-coordinator -p ddpm-worker -p ddpm-bench >&2

# The quickstart config with global batch $1, STEPS steps, logs every 10, one thread.
config() {
  sed -e "s/^batch_size = .*/batch_size = $1/" \
      -e "s/^total_steps = .*/total_steps = $STEPS/" \
      -e "s/^log_every = .*/log_every = 10/" \
      -e "s/^snapshot_every = .*/snapshot_every = 0/" \
      -e "s/^threads = .*/threads = 1/" \
      -e "s#^out_dir = .*#out_dir = \"$WORK/out\"#" configs/quickstart.toml > "$WORK/b$1.toml"
  echo "$WORK/b$1.toml"
}

# Median images/s of the windows after step SKIP in the run's train_log.jsonl.
ips() {
  python3 - "$WORK/out/train_log.jsonl" "$SKIP" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(statistics.median(r["images_per_second"] for r in rows if r["step"] > int(sys.argv[2])))
PY
}

one=$(config "$B")
two=$(config $((2 * B)))
if [ -n "$PYTHON" ]; then
  target/release/ddpm-bench diffusers-config --config configs/quickstart.toml > "$WORK/unet.json"
fi
declare -A results
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/out"; target/release/ddpm train --config "$one" >/dev/null 2>&1
  results[train]+="$(ips) "
  rm -rf "$WORK/out"; target/release/ddpm launch --config "$one" --workers 1 --threads-per-worker 1 >/dev/null 2>&1
  results[launch1]+="$(ips) "
  rm -rf "$WORK/out"; target/release/ddpm launch --config "$two" --workers 2 --threads-per-worker 1 >/dev/null 2>&1
  results[launch2]+="$(ips) "
  if [ -n "$PYTHON" ]; then
    for w in 1 2; do
      r=$("$PYTHON" bench/reference_ddp.py --config configs/quickstart.toml --unet-config "$WORK/unet.json" \
          --workers "$w" --batch "$B" --steps "$STEPS" --skip "$SKIP")
      results[ddp$w]+="$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])') "
    done
  fi
  echo "round $round: train ${results[train]}| launch1 ${results[launch1]}| launch2 ${results[launch2]}| ddp1 ${results[ddp1]:-} | ddp2 ${results[ddp2]:-}" >&2
done
python3 - "${results[train]}" "${results[launch1]}" "${results[launch2]}" "${results[ddp1]:-}" "${results[ddp2]:-}" <<'PY'
import statistics, sys
med = lambda s: statistics.median(float(x) for x in s.split()) if s.strip() else None
train, l1, l2, d1, d2 = (med(a) for a in sys.argv[1:6])
print(f"ddpm train (1 process, 1 thread):        {train:8.1f} images/s")
print(f"ddpm launch --workers 1 (1 thread):      {l1:8.1f} images/s")
print(f"ddpm launch --workers 2 (1 thread each): {l2:8.1f} images/s")
print(f"weak-scaling efficiency (ours):          {l2 / (2 * l1):8.3f}   (against ddpm train: {l2 / (2 * train):.3f})")
if d1 and d2:
    print(f"PyTorch DDP gloo, 1 / 2 workers:         {d1:8.1f} / {d2:.1f} images/s")
    print(f"weak-scaling efficiency (PyTorch DDP):   {d2 / (2 * d1):8.3f}")
    print(f"ours / PyTorch at 2 workers:             {l2 / d2:8.3f}")
PY
