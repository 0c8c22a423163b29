#!/usr/bin/env bash
# Loader benchmark: ddpm-bench loader (this project's training loader) vs a PyTorch
# DataLoader + PIL + torchvision pipeline (bench/reference_loader.py run) on the same folder
# of LSUN-like 256-pixel WebP images, with the same number of workers, alternating the two
# ROUNDS times in one run; prints each run's JSON line and a summary of median images/s.
#
# Usage: bash bench/run_loader.sh
# Environment (all optional):
#   PYTHON      interpreter with torch, torchvision and pillow   (default: python3)
#   PHOTOS      real photos to cut the set from                   (default: .tools/photos, from
#               `make test-tools`)
#   DATA        where the WebP set is written (kept between runs) (default: /tmp/ddpm-lsunlike)
#   N           images in the set                                 (default 512)
#   THREADS     worker counts to compare                          (default "1 2")
#   ROUNDS      alternations per worker count                     (default 3)
#   RESOLUTION, BATCH, WARMUP, BATCHES                            (default 256, 32, 4, 40)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PHOTOS=${PHOTOS:-.tools/photos}
DATA=${DATA:-/tmp/ddpm-lsunlike}
N=${N:-512}
THREADS=${THREADS:-"1 2"}
ROUNDS=${ROUNDS:-3}
RESOLUTION=${RESOLUTION:-256}
BATCH=${BATCH:-32}
WARMUP=${WARMUP:-4}
BATCHES=${BATCHES:-40}

cargo build --release -p ddpm-bench >&2
BENCH="${CARGO_TARGET_DIR:-target}/release/ddpm-bench"
if [[ ! -d "$DATA" ]] || [[ $(ls "$DATA" | wc -l) -ne $N ]]; then
    rm -rf "$DATA"
    "$PYTHON" bench/reference_loader.py make-data --photos "$PHOTOS" --out "$DATA" --n "$N" >&2
fi
OUT=$(mktemp)
common=(--resolution "$RESOLUTION" --batch "$BATCH" --warmup "$WARMUP" --batches "$BATCHES")
for t in $THREADS; do
    for r in $(seq 1 "$ROUNDS"); do
        ours=("$BENCH" loader --dir "$DATA" --threads "$t" "${common[@]}")
        ref=("$PYTHON" bench/reference_loader.py run --dir "$DATA" --workers "$t" "${common[@]}")
        if (( r % 2 )); then "${ours[@]}" | tee -a "$OUT"; "${ref[@]}" | tee -a "$OUT"
        else "${ref[@]}" | tee -a "$OUT"; "${ours[@]}" | tee -a "$OUT"; fi
    done
done
"$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| workers | ours images/s | PyTorch DataLoader images/s | ratio |")
print("|---|---|---|---|")
for t in sorted({r["threads"] for r in rows}):
    ours = statistics.median(r["images_per_second"] for r in rows if r["threads"] == t and r["impl"] == "ddpm-rs")
    ref = statistics.median(r["images_per_second"] for r in rows if r["threads"] == t and r["impl"] != "ddpm-rs")
    print(f"| {t} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f} |")
PY
