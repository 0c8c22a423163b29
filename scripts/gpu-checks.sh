#!/usr/bin/env bash
# The checks that need a GPU: the NCCL tests of ddpm-collective (tests/nccl.rs and the unit
# tests of src/nccl.rs) and of ddpm-worker (tests/nccl_gpu.rs and the unit tests of
# src/comm.rs), run from test executables built elsewhere and carried to a GPU host.
#
# Here (any host with cargo; no CUDA needed):
#   scripts/gpu-checks.sh --build DIR
#     builds the four test executables (features nccl-gpu-tests) and copies them into DIR
#     under fixed names (ddpm_collective-lib, ddpm_collective-nccl, ddpm_worker-lib,
#     ddpm_worker-nccl_gpu). Carry DIR to the GPU host.
#
# There (a CUDA GPU, its driver, and python3 with the CUDA wheel of torch 2.11, which brings
# libtorch_cuda and NCCL as nvidia-nccl-cu13):
#   scripts/gpu-checks.sh [EXECUTABLE_OR_DIR...]
#     runs each executable with --test-threads=1. A DIR is searched for the fixed names, else
#     for cargo's names (ddpm_collective-*, nccl-*, ddpm_worker-*, nccl_gpu-*: the newest
#     built with the GPU features). No argument: ${CARGO_TARGET_DIR:-target}/debug/deps.
#
# Environment (there):
#   DDPM_NCCL_LIBRARY  the libnccl.so.2 to use; default: the one in torch's wheel (found
#                      with python3 as crates/ddpm-collective/README.md explains).
#   LD_LIBRARY_PATH    torch's lib directory is put first (libtorch_cpu, libc10 and
#                      libtorch_cuda for the worker's tests; the executables' own rpath names
#                      the build host's libtorch).
#   GPU_CHECKS_TIMEOUT seconds per executable (default 120).
#   NCCL_DEBUG         default WARN. If NCCL itself does not start (a sandboxed host), rerun
#                      with NCCL_DEBUG=INFO, and try NCCL_CUMEM_ENABLE=0 NCCL_RAS_ENABLE=0.
#   OUT                if set, logs go to $OUT/gpu-checks/: one <name>.log per executable,
#                      env.txt (GPU, libraries) and summary.txt (PASS/FAIL per executable).
# The exit status is 0 when every executable passed.
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} == --build ]]; then
    dir=${2:?usage: scripts/gpu-checks.sh --build DIR}
    mkdir -p "$dir"
    cd "$here" || exit 1
    for spec in "ddpm-collective lib:ddpm_collective test:nccl" "ddpm-worker lib:ddpm_worker test:nccl_gpu"; do
        read -r package want_lib want_test <<<"$spec"
        cargo test -p "$package" --features nccl-gpu-tests --no-run --message-format=json \
            >"$dir/.cargo-$package.json" || exit 1
        python3 - "$dir" "$package" "$want_lib" "$want_test" <<'EOF' || exit 1
import json, shutil, subprocess, sys
dir, package, *wanted = sys.argv[1:]
names = {"lib:ddpm_collective": "ddpm_collective-lib", "test:nccl": "ddpm_collective-nccl",
         "lib:ddpm_worker": "ddpm_worker-lib", "test:nccl_gpu": "ddpm_worker-nccl_gpu"}
found = {}
for line in open(f"{dir}/.cargo-{package}.json"):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    key = f"{t['kind'][0]}:{t['name']}"
    if key in wanted:
        found[key] = m["executable"]
for key in wanted:
    if key not in found:
        sys.exit(f"cargo built no executable for {package} {key}")
    shutil.copy2(found[key], f"{dir}/{names[key]}")
    # Debug sections are not needed there and would count against what can be carried.
    if shutil.which("objcopy"):
        subprocess.run(["objcopy", "--strip-debug", f"{dir}/{names[key]}"], check=True)
    print(f"{dir}/{names[key]}  <-  {found[key]}")
EOF
        rm -f "$dir/.cargo-$package.json"
    done
    echo "carry $dir to the GPU host and run: scripts/gpu-checks.sh $dir"
    exit 0
fi

log_dir=""
if [[ -n ${OUT:-} ]]; then
    log_dir="$OUT/gpu-checks"
    mkdir -p "$log_dir"
fi
say() { echo "$*"; if [[ -n $log_dir ]]; then echo "$*" >>"$log_dir/summary.txt"; fi; }

# torch's lib directory and NCCL, from the wheel.
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
if [[ -n $torch_lib ]]; then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "warning: python3 cannot import torch; LD_LIBRARY_PATH must already hold libtorch 2.11 (CUDA build)" >&2
fi
if [[ -z ${DDPM_NCCL_LIBRARY:-} ]]; then
    nccl=$(python3 -c 'import glob, os, torch; print(sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "**", "libnccl.so.2"), recursive=True))[0])' 2>/dev/null)
    if [[ -n $nccl ]]; then
        export DDPM_NCCL_LIBRARY=$nccl
    else
        echo "warning: no libnccl.so.2 in torch's wheel; NCCL is looked up as libnccl.so.2 on the library path" >&2
    fi
fi
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Well below a 600 s remote command limit, so that one hang leaves time (and logs) for the rest.
timeout_s=${GPU_CHECKS_TIMEOUT:-120}

# The newest executable in $1 matching $2 whose test list contains $3 (built with the GPU
# features: the same names are also built without them).
pick() {
    local f
    for f in $(ls -t "$1"/$2 2>/dev/null); do
        [[ -f $f && -x $f && $f != *.d ]] || continue
        if "$f" --list 2>/dev/null | grep -q -- "$3"; then
            echo "$f"
            return
        fi
    done
}

executables=()
add_dir() {
    local d=$1 name pattern marker f
    while read -r name pattern marker; do
        if [[ -x $d/$name ]]; then
            executables+=("$d/$name")
            continue
        fi
        f=$(pick "$d" "$pattern" "$marker")
        if [[ -n $f ]]; then
            executables+=("$f")
        else
            say "MISSING $name: nothing in $d matches $pattern with a test named like $marker"
            missing=1
        fi
    done <<'EOF'
ddpm_collective-lib ddpm_collective-* nccl::tests::
ddpm_collective-nccl nccl-* one_rank_reduces_and_broadcasts
ddpm_worker-lib ddpm_worker-* comm::tests::a_host_without_nccl
ddpm_worker-nccl_gpu nccl_gpu-* the_gradient_average_runs_in_place
EOF
}

missing=0
if [[ $# -eq 0 ]]; then
    set -- "${CARGO_TARGET_DIR:-$here/target}/debug/deps"
fi
for arg in "$@"; do
    if [[ -d $arg ]]; then
        add_dir "$arg"
    elif [[ -x $arg ]]; then
        executables+=("$arg")
    else
        say "MISSING $arg: not an executable or a directory"
        missing=1
    fi
done

if [[ -n $log_dir ]]; then
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "host: $(hostname)"
        nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1
        echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
        echo "DDPM_NCCL_LIBRARY=${DDPM_NCCL_LIBRARY:-}"
        echo "NCCL_DEBUG=$NCCL_DEBUG"
        python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())' 2>&1
        printf 'executable: %s\n' "${executables[@]}"
    } >"$log_dir/env.txt"
fi

if [[ ${#executables[@]} -eq 0 ]]; then
    say "FAIL: no test executable to run"
    exit 1
fi

failed=0
for exe in "${executables[@]}"; do
    name=$(basename "$exe")
    echo "== $exe --test-threads=1"
    if [[ -n $log_dir ]]; then
        timeout "$timeout_s" "$exe" --test-threads=1 2>&1 | tee "$log_dir/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout "$timeout_s" "$exe" --test-threads=1 2>&1
        rc=$?
    fi
    if [[ $rc -eq 0 ]]; then
        say "PASS $name"
    elif [[ $rc -eq 124 ]]; then
        say "FAIL $name (timed out after $timeout_s s)"
        failed=1
    else
        say "FAIL $name (exit $rc)"
        failed=1
    fi
done
exit $((failed || missing))
