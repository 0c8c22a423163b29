#!/usr/bin/env bash
# Recovery after a worker kill, on the quickstart config with 3 CPU workers (`ddpm launch`):
# an uninterrupted run and a run whose worker KILL_RANK is SIGKILLed once rank 0 has logged
# step KILL_STEP (`--max-restarts 1` starts it again, as a StatefulSet would), alternated
# ROUNDS times. From the logs' timestamps it prints, per interrupted run: detection (kill to
# the coordinator moving to the next generation), re-formation (to the new ring formed),
# reload (to the checkpoint restored), first step (to the first step of the new generation),
# the steps redone (the kill step minus the restored one), and the wall time lost against the
# median uninterrupted run. The default lease (30 s) is kept: detection must not wait for it.
# When PYTHON has torch and diffusers, the same is measured in the same rounds for torchrun
# (TorchElastic, `--max-restarts 1`, gloo, DistributedDataParallel on diffusers' UNet2DModel of
# the same config; bench/reference_elastic.py): detection is its agent's log line naming the
# failed worker, re-formation the first process of the restarted group.
#
# Usage: bash bench/run_recovery.sh
# Environment (all optional):
#   PROFILE     release or debug binaries (default release)
#   STEPS, EVERY, KILL_STEP, KILL_RANK, ROUNDS   (default 60, 10, 35, 1, 3)
#   DATA        the training images (default the quickstart's Fashion-MNIST, `make data`)
#   PYTHON      interpreter with torch + diffusers for the torchrun reference (skipped if unset)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
STEPS=${STEPS:-60}
EVERY=${EVERY:-10}
KILL_STEP=${KILL_STEP:-35}
KILL_RANK=${KILL_RANK:-1}
ROUNDS=${ROUNDS:-3}
DATA=${DATA:-.data/fashion-mnist/train-images-idx3-ubyte.gz}
PYTHON=${PYTHON:-}

if [ "$PROFILE" = release ]; then
    cargo build --release -p ddpm-cli -p ddpm-coordinator -p ddpm-worker >&2
else
    cargo build -p ddpm-cli -p ddpm-coordinator -p ddpm-worker >&2
fi
DDPM="${CARGO_TARGET_DIR:-target}/$PROFILE/ddpm"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "$PYTHON" ]; then
    cargo build --release -p ddpm-bench >&2
    "${CARGO_TARGET_DIR:-target}/release/ddpm-bench" diffusers-config --config configs/quickstart.toml \
        > "$WORK/unet.json"
fi

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

last_event_step() { # the reference's event log
    tail -n 1 "$1" 2>/dev/null | sed -n 's/.*"event": "step".*"step": \([0-9]*\)}$/\1/p'
}

# One torchrun run of the reference (plain or killed), its result appended to RESULTS.
reference() { # kind round
    local dir="$WORK/ref-$1$2" start torchrun killed_at
    mkdir -p "$dir"
    start=$(date +%s%N)
    # TZ=UTC: torchrun's log lines carry the local time of day, read below as UTC.
    TZ=UTC "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 3 --max-restarts 1 \
        --monitor-interval 0.1 bench/reference_elastic.py --ddpm-config "$WORK/plain$2.toml" \
        --unet-config "$WORK/unet.json" --total-steps "$STEPS" --checkpoint-every "$EVERY" \
        --state-dir "$dir" --events "$dir/log.jsonl" > "$dir/out.log" 2>&1 &
    torchrun=$!
    if [ "$1" = killed ]; then
        # Polled as cheaply as ddpm's side is (no interpreter per poll): rank 0's step
        # events are the only lines written while the first group trains.
        until s=$(last_event_step "$dir/log.jsonl"); [ "${s:-0}" -ge "$KILL_STEP" ]; do
            kill -0 "$torchrun" 2>/dev/null || { cat "$dir/out.log" >&2; return 1; }
            sleep 0.01
        done
        kill -9 "$(cat "$dir/pid.$KILL_RANK")"
        killed_at=$(date +%s.%N)
    fi
    wait "$torchrun" || { cat "$dir/out.log" >&2; return 1; }
    python3 - "$1" "$dir" "${killed_at:-0}" "$(( ($(date +%s%N) - start) / 1000000 ))" >> "$RESULTS" <<'PY'
import json, re, sys
from datetime import datetime, timezone
kind, d, t0, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]) / 1000
if kind == "plain":
    print(json.dumps({"kind": "ref-plain", "seconds": seconds}))
    raise SystemExit
events = [json.loads(l) for l in open(f"{d}/log.jsonl")]
later = lambda e, k: [x["t"] - t0 for x in events if x["event"] == e and x["attempt"] == 1 and k(x)]
detect = None
for line in open(f"{d}/out.log"):  # glog-style: E1129 10:42:11.171000 pid file:line] failed (exitcode: -9)
    m = re.match(r"[EW]\d{4} (\d\d:\d\d:\d\d\.\d+) .*failed \(exitcode", line)
    if m:
        day = datetime.fromtimestamp(t0, timezone.utc).date().isoformat()
        detect = datetime.fromisoformat(f"{day}T{m.group(1)}+00:00").timestamp() - t0
        break
restored = [x for x in events if x["event"] == "restored" and x["attempt"] == 1 and x["rank"] == 0][0]
print(json.dumps({"kind": "ref-killed", "seconds": seconds, "detect": detect,
                  "formed": min(later("started", lambda x: True)),
                  "reloaded": restored["t"] - t0, "first_step": min(later("step", lambda x: True)),
                  "restored_step": restored["step"]}))
PY
}

for r in $(seq 1 "$ROUNDS"); do
    if [ -n "$PYTHON" ]; then
        config "plain$r"
        reference plain "$r"
        reference killed "$r"
    fi
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
print("| run | uninterrupted s | interrupted s | lost s | detect s | re-formed s | reloaded s | first step s | steps redone |")
print("|---|---|---|---|---|---|---|---|---|")
for name, prefix in (("ddpm launch", ""), ("torchrun (reference)", "ref-")):
    plain = [r["seconds"] for r in rows if r["kind"] == prefix + "plain"]
    killed = [r for r in rows if r["kind"] == prefix + "killed"]
    if not plain or not killed:
        continue
    plain = statistics.median(plain)
    med = lambda k: statistics.median(r[k] for r in killed if r[k] is not None)
    print(f"| {name} | {plain:.1f} | {med('seconds'):.1f} | {med('seconds') - plain:.1f} | "
          f"{med('detect'):.2f} | {med('formed'):.2f} | {med('reloaded'):.2f} | "
          f"{med('first_step'):.2f} | {kill_step - statistics.median(r['restored_step'] for r in killed):.0f} |")
    for r in killed:
        print(json.dumps(r), file=sys.stderr)
PY
