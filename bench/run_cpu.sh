#!/usr/bin/env bash
# CPU benchmark: this project's U-Net (ddpm-bench) vs PyTorch eager + diffusers UNet2DModel
# (bench/reference_unet.py) on one training step and one sampling step, alternating the two
# implementations ROUNDS times in one run, then a summary table.
#
# Usage: bash bench/run_cpu.sh
# Environment (all optional):
#   PYTHON       interpreter with torch + diffusers (default: bench/.venv, created on first use
#                with `pip install torch==2.11.0 diffusers==0.35.1`)
#   ROUNDS       alternations per (model, benchmark)                          (default 3)
#   THREADS      intra-op threads for both sides                              (default 2)
#   MODELS       configs to run, from configs/                                (default "quickstart cifar10")
#   KINDS        benchmarks                                 (default "train-step sample-step")
#   PHASES=1     also run train-phases (forward / backward / update split) once per side
#   BATCH_quickstart, BATCH_cifar10        batch sizes                        (default 32, 8)
#   WARMUP_<model>, ITERS_<model>          untimed / timed steps per process
#                                          (default quickstart 3/10, cifar10 2/4)
#   OUT_DIR      where the JSON lines and diffusers configs go                (default: mktemp -d)
#   QUIET_BUSY   before each process, wait until the machine's CPU use over 1 s is below this
#                share (other jobs make 2-thread OpenMP numbers meaningless)  (default 0.25)
#   QUIET_MAX_WAIT  give up waiting after this many seconds and run anyway   (default 60)
#   MAX_OTHER    the summary uses only rounds in which other processes took at most this share
#                of the machine during both timed loops (all rounds if none)  (default 0.10)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
MODELS=${MODELS:-"quickstart cifar10"}
KINDS=${KINDS:-"train-step sample-step"}
BATCH_quickstart=${BATCH_quickstart:-32}
BATCH_cifar10=${BATCH_cifar10:-8}
WARMUP_quickstart=${WARMUP_quickstart:-3}
ITERS_quickstart=${ITERS_quickstart:-10}
WARMUP_cifar10=${WARMUP_cifar10:-2}
ITERS_cifar10=${ITERS_cifar10:-4}

echo "== building ddpm-bench (release)" >&2
cargo build --release -p ddpm-bench >&2
BENCH="${CARGO_TARGET_DIR:-target}/release/ddpm-bench"

if [[ -z "${PYTHON:-}" ]]; then
    VENV=bench/.venv
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "== creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch, diffusers" 2>/dev/null; then
        echo "== installing torch==2.11.0 diffusers==0.35.1 into $VENV" >&2
        "$VENV/bin/pip" install --quiet torch==2.11.0 diffusers==0.35.1 >&2
    fi
    PYTHON="$VENV/bin/python"
fi
"$PYTHON" -c "import torch, diffusers; print('== python: torch', torch.__version__, 'diffusers', diffusers.__version__)" >&2

OUT_DIR=${OUT_DIR:-$(mktemp -d -t ddpm-bench.XXXXXX)}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
: >"$RESULTS"
echo "== results: $RESULTS" >&2

busy_ticks() { # busy clock ticks of the whole machine (user nice system irq softirq steal)
    awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat
}

wait_quiet() { # wait (at most QUIET_MAX_WAIT s) until the CPUs are mostly idle for 1 s
    [[ -r /proc/stat ]] || return 0
    local limit=${QUIET_MAX_WAIT:-60} thr=${QUIET_BUSY:-0.25} hz cpus waited=0 a b
    hz=$(getconf CLK_TCK)
    cpus=$(nproc)
    while :; do
        a=$(busy_ticks)
        sleep 1
        b=$(busy_ticks)
        if awk -v d=$((b - a)) -v hz="$hz" -v c="$cpus" -v t="$thr" 'BEGIN{exit !(d / hz / c < t)}'; then
            return 0
        fi
        waited=$((waited + 1))
        if ((waited >= limit)); then
            echo "   (machine still busy after ${limit}s; running anyway)" >&2
            return 0
        fi
    done
}

run_pair() { # model kind round
    local model=$1 kind=$2 round=$3
    local cfg="configs/$model.toml" dcfg="$OUT_DIR/$model.diffusers.json"
    local b w i
    b=$(eval echo "\${BATCH_$model:-0}")
    w=$(eval echo "\${WARMUP_$model:-2}")
    i=$(eval echo "\${ITERS_$model:-5}")
    local ours=("$BENCH" "$kind" --config "$cfg" --threads "$THREADS" --warmup "$w" --iters "$i")
    local torch=("$PYTHON" bench/reference_unet.py "$kind" --config "$cfg" --unet-config "$dcfg"
        --threads "$THREADS" --warmup "$w" --iters "$i")
    if [[ "$b" != 0 ]]; then
        ours+=(--batch "$b")
        torch+=(--batch "$b")
    fi
    # Alternate which side goes first so that slow drift in machine load hits both.
    local order=(ours torch)
    ((round % 2 == 0)) && order=(torch ours)
    for side in "${order[@]}"; do
        wait_quiet
        echo "-- $model $kind round $round: $side" >&2
        if [[ $side == ours ]]; then
            "${ours[@]}" | tee -a "$RESULTS"
        else
            "${torch[@]}" | tee -a "$RESULTS"
        fi
    done
}

for model in $MODELS; do
    "$BENCH" diffusers-config --config "configs/$model.toml" >"$OUT_DIR/$model.diffusers.json"
    for kind in $KINDS; do
        for ((r = 1; r <= ROUNDS; r++)); do
            run_pair "$model" "$kind" "$r"
        done
    done
    if [[ "${PHASES:-0}" == 1 ]]; then
        run_pair "$model" train-phases 1
    fi
done

echo >&2
"$PYTHON" - "$RESULTS" "${MAX_OTHER:-0.10}" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
max_other = float(sys.argv[2])
keys = []
for r in rows:
    k = (r["config"], r["bench"])
    if k not in keys:
        keys.append(k)
def quiet(r):
    return (r.get("other_cpu_frac") or 0.0) <= max_other
print(f"threads={rows[0]['threads']}. s/step: median over all timed steps of the quiet rounds "
      f"(rounds in which other processes used <= {max_other:.0%} of the machine on both sides; "
      "all rounds if none was quiet). ratio range: min-max over those rounds of "
      "ours median / PyTorch median. RSS: peak (VmHWM) over all rounds.")
hdr = ("model", "benchmark", "batch", "ours s/step", "PyTorch s/step", "ratio ours/PT",
       "ratio range", "ours RSS MiB", "PT RSS MiB", "quiet rounds")
print("| " + " | ".join(hdr) + " |")
print("|" + "|".join("---" for _ in hdr) + "|")
for k in keys:
    o = [r for r in rows if (r["config"], r["bench"]) == k and r["impl"] == "ours"]
    p = [r for r in rows if (r["config"], r["bench"]) == k and r["impl"] == "pytorch"]
    pairs = list(zip(o, p))  # one pair per round, in run order
    if not pairs:
        continue
    used = [(a, b) for a, b in pairs if quiet(a) and quiet(b)] or pairs
    om = statistics.median([t for a, _ in used for t in a["times_s"]])
    pm = statistics.median([t for _, b in used for t in b["times_s"]])
    per = [a["median_s"] / b["median_s"] for a, b in used]
    nq = sum(1 for a, b in pairs if quiet(a) and quiet(b))
    print(f"| {k[0]} | {k[1]} | {o[0]['batch']} | {om:.4f} | {pm:.4f} | {om / pm:.2f} | "
          f"{min(per):.2f}-{max(per):.2f} | {max(r['peak_rss_mib'] for r in o):.0f} | "
          f"{max(r['peak_rss_mib'] for r in p):.0f} | {nq}/{len(pairs)} |")
for r in rows:
    if "phases_median_s" in r:
        print(f"train-phases {r['impl']} {r['config']} batch {r['batch']} "
              f"(other CPU {r.get('other_cpu_frac') or 0:.0%}):")
        for field, fmt in [("phases_median_s", "{:.4f}"), ("update_variants_median_s", "{:.4f}"),
                           ("minor_faults_per_step", "{}")]:
            if field in r:
                print(f"  {field}: " + ", ".join(f"{a}=" + fmt.format(b) for a, b in r[field].items()))
EOF
