#!/usr/bin/env bash
# nnfast on a GPU, every verdict and figure from one call of at most 9 minutes.
#
#   NNFAST_COMMIT=<sha> bash benchmarks/gpu/first_contact.sh            # on the GPU machine
#   bash benchmarks/gpu/first_contact.sh --dry-run                     # anywhere: every stage on the CPU
#
# COMPUTE_SANITIZER names the compute-sanitizer to use (default: the one on PATH, else under /usr/local/cuda*).
#
# Runs from a bare checkout with python3 (PYTHONPATH is set to the checkout; nothing is installed).
# Stages, in order: environment (nvidia-smi, versions, SMs, clocks); NVRTC warm-up of every kernel file
# in parallel processes, timed; nnfast selftest on cupy (float32 and float64); pytest -m gpu;
# compute-sanitizer memcheck (CuPy's memory pool off) and racecheck on a driver that launches every
# kernel family and every GEMM tile configuration (a device the sanitizer refuses is reported, not
# failed); nnfast bench --size large; one training step eager against TrainStep's CUDA graph
# (train_step.py: steps/s, host time, synchronisations and launches per step, PyTorch eager beside);
# training on the digits and on an MNIST-sized synthetic set through the CLI, then the same runs in
# PyTorch eager on the GPU; the summary, printed last.
#
# pytest -m gpu runs the NCCL engine in a world of one rank through mpiexec when mpi4py and an MPI
# are importable (the mpi extra); a machine without them reports that test as skipped. To bring
# them to a machine without a registry: `pip download mpi4py mpich -d wheels` here, then there
# `pip install --no-index --find-links wheels mpi4py mpich` before this script.
#
# Every stage runs under `timeout`: its own cap, and never so long that the stages after it lose
# their minimum (their floor) before the deadline (NNFAST_FIRST_CONTACT_BUDGET seconds, default
# 520, from the start). A stage that fails or times out is recorded and the next one runs.
#
# Files in $OUT (default ./first_contact_out, git-ignored): summary.md (ready to commit as
# benchmarks/gpu/RESULTS.md), selftest.json, bench.json, train.json, logs.tar.gz.
#
# --dry-run runs every stage on the numba backend at tiny sizes (NVRTC compiles one instantiation
# per file; the sanitizer stages run their driver without compute-sanitizer; PyTorch on the CPU if
# it is installed), so that CI keeps this script working.

set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
HERE=benchmarks/gpu
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ $# -gt 0 ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
OUT="${OUT:-$ROOT/first_contact_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nnfast-first-contact.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
: > "$LOGS/stages.tsv"

# name: cap and floor in seconds (see above).
ORDER=(environment warm-up selftest pytest-gpu memcheck racecheck bench train-step data train-digits
       train-synthetic torch-digits torch-synthetic)
declare -A CAP=([environment]=20 [warm-up]=90 [selftest]=90 [pytest-gpu]=120 [memcheck]=75 [racecheck]=75
                [bench]=220 [train-step]=45 [data]=30 [train-digits]=40 [train-synthetic]=50 [torch-digits]=40
                [torch-synthetic]=50)
declare -A FLOOR=([environment]=8 [warm-up]=30 [selftest]=30 [pytest-gpu]=40 [memcheck]=25 [racecheck]=25
                  [bench]=55 [train-step]=12 [data]=8 [train-digits]=12 [train-synthetic]=15 [torch-digits]=12
                  [torch-synthetic]=15)
SUMMARY_CAP=20
BUDGET="${NNFAST_FIRST_CONTACT_BUDGET:-520}"
START=$(date +%s)
DEADLINE=$((START + BUDGET - SUMMARY_CAP))
RESERVE=0
for s in "${ORDER[@]}"; do RESERVE=$((RESERVE + FLOOR[$s])); done

NOTE=""
# stage NAME COMMAND...: run COMMAND under its time limit, its output in logs/NAME.log.
stage() {
    local name=$1
    shift
    RESERVE=$((RESERVE - FLOOR[$name]))
    local left=$((DEADLINE - $(date +%s) - RESERVE))
    local limit=$((CAP[$name] < left ? CAP[$name] : left))
    if [ "$limit" -lt 5 ]; then
        printf '%s\t-1\t0\t0\tno time left in the %s s budget\n' "$name" "$BUDGET" >> "$LOGS/stages.tsv"
        echo "== $name: not run (no time left)"
        NOTE=""
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    local t0 ms rc
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    printf '%s\t%s\t%d.%03d\t%s\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" "$NOTE" \
        >> "$LOGS/stages.tsv"
    tail -n 2 "$LOGS/$name.log" | cut -c1-200 | sed 's/^/   /'
    NOTE=""
}

if [ "$DRY" = 1 ]; then
    BACKEND=numba
    SANITIZER=""
    SELFTEST=(--dtype float32)
    BENCH=(--backend numba --quick --ops softmax_cross_entropy,adam_update --no-torch)
    DATA=(--train 600 --test 200)
    DIGITS=(--epochs 1 --hidden 32)
    SYNTH=(--epochs 1 --hidden 32)
    TORCH=(--device cpu)
    WARM=(--dry-run)
    STEP=(--dry-run --no-torch)
else
    BACKEND=cupy
    SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
        | head -n 1)}"
    SELFTEST=(--dtype all)
    BENCH=(--backend cupy --size large)
    DATA=()
    DIGITS=()
    SYNTH=(--epochs 3)
    TORCH=(--device cuda)
    WARM=()
    STEP=()
fi
SYNTH+=(--data "$WORK/synthetic.npz" --batch-size 128)
# Options of this compute-sanitizer: CuPy's own probing CUDA calls may fail by design, which is not a
# kernel's memory error; and a race check reports its hazards.
MEMCHECK=(--tool memcheck --error-exitcode 99)
RACECHECK=(--tool racecheck --error-exitcode 99)
if [ -n "$SANITIZER" ]; then
    HELP="$("$SANITIZER" --help 2>&1)"
    case "$HELP" in *--report-api-errors*) MEMCHECK+=(--report-api-errors no) ;; esac
    case "$HELP" in *--racecheck-report*) RACECHECK+=(--racecheck-report hazard) ;; esac
fi

stage environment "$PY" "$HERE/environment.py" --json "$LOGS/environment.json"
stage warm-up "$PY" "$HERE/warm_up.py" "${WARM[@]}" --json "$LOGS/warm_up.json"
stage selftest "$PY" -m nnfast.cli selftest --backend "$BACKEND" "${SELFTEST[@]}" --json "$OUT/selftest.json"
stage pytest-gpu "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$LOGS/pytest-gpu.xml" tests
if [ -n "$SANITIZER" ]; then
    stage memcheck "$SANITIZER" "${MEMCHECK[@]}" "$PY" "$HERE/sanitizer_driver.py" --no-pool
    stage racecheck "$SANITIZER" "${RACECHECK[@]}" "$PY" "$HERE/sanitizer_driver.py" --quick --dtype float32
elif [ "$DRY" = 1 ]; then
    NOTE="dry run: the driver without compute-sanitizer"
    stage memcheck "$PY" "$HERE/sanitizer_driver.py" --backend "$BACKEND" --dtype float32
    NOTE="dry run: the driver without compute-sanitizer"
    stage racecheck "$PY" "$HERE/sanitizer_driver.py" --backend "$BACKEND" --quick --dtype float32
else
    stage memcheck bash -c 'echo "compute-sanitizer not found"; exit 4'
    stage racecheck bash -c 'echo "compute-sanitizer not found"; exit 4'
fi
stage bench "$PY" -m nnfast.cli bench "${BENCH[@]}" --no-progress --json "$OUT/bench.json"
stage train-step "$PY" "$HERE/train_step.py" "${STEP[@]}" --json "$LOGS/train_step.json"
stage data "$PY" "$HERE/synthetic_mnist.py" "$WORK/synthetic.npz" "${DATA[@]}"
stage train-digits "$PY" -m nnfast.cli train --backend "$BACKEND" "${DIGITS[@]}" --no-progress
stage train-synthetic "$PY" -m nnfast.cli train --backend "$BACKEND" "${SYNTH[@]}" --no-progress
stage torch-digits "$PY" "$HERE/torch_train.py" "${TORCH[@]}" "${DIGITS[@]}"
stage torch-synthetic "$PY" "$HERE/torch_train.py" "${TORCH[@]}" "${SYNTH[@]}"

DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
timeout -k 5 "$SUMMARY_CAP" "$PY" "$HERE/summary.py" --logs "$LOGS" --out "$OUT" "${DRYFLAG[@]}" \
    > "$LOGS/summary.txt" 2>&1
echo "summary.py exit status $?" >> "$LOGS/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo
# On a GPU, summary.md is the record of the run; the dry run's is not one.
[ "$DRY" = 1 ] || echo "== to record this run: cp $OUT/summary.md benchmarks/gpu/RESULTS.md, then commit it"
echo "== summary ($(($(date +%s) - START)) s in all; $(ls "$OUT" | tr '\n' ' ')in $OUT)"
cat "$LOGS/summary.txt"
rm -rf "$WORK"
