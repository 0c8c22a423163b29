#!/usr/bin/env bash
# Recovery after a worker kill, on the quickstart config with 3 CPU workers (`ddpm launch`):
# an uninterrupted run and a run whose worker KILL_RANK is SIGKILLed once rank 0 has logged
# step KILL_STEP (`--max-restarts 1` starts it again, as a StatefulSet would), alternated
# ROUNDS times. From the logs' timestamps it prints, per interrupted run: detection (kill to
# the coordinator moving to the next generation), re-formation (to the new ring formed),
# reload (to the checkpoint restored), first step (to the first step of the new generation),
# the steps redone (the kill step minus the restored one), and the wall time lost against the
# median uninterrupted run. The default lease (30 s) is kept: detection must not wait for it.
#
# Usage: bash bench/run_recovery.sh
# Environment (all optional):
#   PROFILE     release or debug binaries (default release)
#   STEPS, EVERY, KILL_STEP, KILL_RANK, ROUNDS   (default 60, 10, 35, 1, 3)
#   DATA        the training images (default the quickstart's Fashion-MNIST, `make data`)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
STEPS=${STEPS:-60}
EVERY=${EVERY:-10}
KILL_STEP=${KILL_STEP:-35}
KILL_RANK=${KILL_RANK:-1}
ROUNDS=${ROUNDS:-3}
DATA=${DATA:-.data/fashion-mnist/train-images-idx3-ubyte.gz}

if [ "$PROFILE" = release ]; then
    cargo build --release -p ddpm-cli -p ddpm-coordinator -p ddpm-worker >&2
else
    cargo build -p ddpm-cli -p ddpm-coordinator -p ddpm-worker >&2
fi
DDPM="${CARGO_TARGET_DIR:-target}/$PROFILE/ddpm"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

config() { # name
    sed -e "s|name = \"quickstart\"|name = \"$1\"|" \
        -e "s|out_dir = \"runs/quickstart\"|out_dir = \"$WORK/$1\"|" \
        -e "s|source = \"idx:.data/fashion-mnist/train-images-idx3-ubyte.gz\"|source = \"idx:$(realpath "$DATA")\"|" \
        -e "s|total_steps = 1000|total_steps = $STEPS|" \
        -e "s|log_every = 50|log_every = 1|" \
        -e "s|snapshot_every = 500|snapshot_every = 0|" \
        -e "s|threads = 0|threads = 1|" configs/quickstart.toml > "$WORK/$1.toml"
    printf '\n[checkpoint]\nevery_steps = %s\n' "$EVERY" >> "$WORK/$1.toml"
}

last_step() { # train log
    tail -n 1 "$1" 2>/dev/null | sed -n 's/.*"step":\([0-9]*\).*/\1/p'
}

RESULTS="$WORK/results.jsonl"
for r in $(seq 1 "$ROUNDS"); do
    for kind in plain killed; do
        name="$kind$r"
        config "$name"
        start=$(date +%s%N)
        if [ "$kind" = plain ]; then
            "$DDPM" launch --config "$WORK/$name.toml" --workers 3 2> "$WORK/$name.log" >/dev/null
            echo "{\"kind\": \"plain\", \"ms\": $(( ($(date +%s%N) - start) / 1000000 ))}" >> "$RESULTS"
            continue
        fi
        "$DDPM" launch --config "$WORK/$name.toml" --workers 3 --max-restarts 1 \
            2> "$WORK/$name.log" >/dev/null &
        launcher=$!
        until s=$(last_step "$WORK/$name/train_log.jsonl"); [ "${s:-0}" -ge "$KILL_STEP" ]; do
            sleep 0.01
        done
        victim=$(pgrep -P "$launcher" -f -- "--rank $KILL_RANK")
        kill -9 "$victim"
        killed_at=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
        wait "$launcher"
        ms=$(( ($(date +%s%N) - start) / 1000000 ))
        python3 - "$WORK/$name.log" "$killed_at" "$ms" >> "$RESULTS" <<'PY'
import json, re, sys
from datetime import datetime
log, killed_at, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000
ts = lambda s: datetime.fromisoformat(s[:26].rstrip("Z"))
t0 = ts(killed_at)
def first(pattern):
    for line in open(log):
        m = re.search(r"(\d{4}-\d\d-\d\dT[\d:.]+)Z", line)
        if m and re.search(pattern, line) and ts(m.group(1)) >= t0:
            return (ts(m.group(1)) - t0).total_seconds(), line
    raise SystemExit(f"{log}: no line matching {pattern!r} after the kill")
detect, _ = first(r"generation \d+ waits for its members")
formed, _ = first(r"the ring of generation \d+ is formed")
reload_, line = first(r"worker 0\].*restored the checkpoint")
restored = int(re.search(r"step=(\d+)", line).group(1))
step, _ = first(r"worker 0\].*generation=2\}:step.*progress")
print(json.dumps({"kind": "killed", "seconds": seconds, "detect": detect, "formed": formed,
                  "reloaded": reload_, "first_step": step, "restored_step": restored}))
PY
    done
done
python3 - "$RESULTS" "$KILL_STEP" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    r.setdefault("seconds", r.get("ms", 0) / 1000)
kill_step = int(sys.argv[2])
plain = statistics.median(r["seconds"] for r in rows if r["kind"] == "plain")
killed = [r for r in rows if r["kind"] == "killed"]
med = lambda k: statistics.median(r[k] for r in killed)
print("| uninterrupted s | interrupted s | lost s | detect s | re-formed s | reloaded s | first step s | steps redone |")
print("|---|---|---|---|---|---|---|---|")
print(f"| {plain:.1f} | {med('seconds'):.1f} | {med('seconds') - plain:.1f} | {med('detect'):.2f} | "
      f"{med('formed'):.2f} | {med('reloaded'):.2f} | {med('first_step'):.2f} | "
      f"{kill_step - statistics.median(r['restored_step'] for r in killed):.0f} |")
for r in killed:
    print(json.dumps(r), file=sys.stderr)
PY
