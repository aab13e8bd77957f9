#!/usr/bin/env bash
# The prepared GPU check: everything a GPU user runs, measured once, in about 8 minutes on one H100.
#
#   ./gpu_check.sh [OUT]          # results under OUT (default runs/gpu); checkpoints under OUT/../gpu_work
#
#   1. bench    bench.py on CUDA: sampling refined vs CFG (batch 256, 20 steps, bf16), the MSD step against
#               full backprop (N = 10), teacher training of dit-cifar and unet-cifar at batch 128 in fp32,
#               bf16, and bf16 with compile / channels-last: images/s and TFLOP/s as a share of bf16 peak
#   2. mini     the whole job in miniature on the embedded set at 32 x 32 with the unet-cifar preset
#               (teacher, pairs, refiner, table) under --device cuda --amp bf16
#   3. tests    the tests marked `device` with --device cuda
#
# Each part has its own time limit and log; a failed part does not stop the others. summary.txt says how
# each ended. Without CUDA it prints one line and exits 2. GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=tiny runs
# the same plumbing at toy sizes on a CPU (how the script itself was tried before a GPU was lent).
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
OUT=${1:-runs/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE:-full}

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: gpu_check.sh needs a CUDA GPU, and torch here sees none; nothing was run" >&2
    exit 2
fi
WORK="$(dirname "$OUT")/gpu_work"  # checkpoints and pairs: large, kept out of the results folder
mkdir -p "$OUT" "$WORK"
: > "$OUT/summary.txt"

if [ "$SIZE" = tiny ]; then
    MODELS="unet-tiny dit-tiny"; BATCH=16; TEACHER_BATCH=8; REPEATS=1; SPEED=""
    MINI=(--model unet-tiny --image-size 16 --steps 20 --batch-size 16)
    MINI_REFINER=(--pairs 200 --steps 10 --val-every 5 --eval-n 100 --batch-size 16)
    TESTS=(-k "library_makes or bf16")
else
    MODELS="dit-cifar unet-cifar"; BATCH=256; TEACHER_BATCH=128; REPEATS=3; SPEED="--compile --channels-last"
    MINI=(--model unet-cifar --image-size 32 --steps 1200 --batch-size 128 --lr 1e-3 --warmup 100 --ema 0.995)
    MINI_REFINER=(--pairs 4000 --steps 400 --val-every 100 --eval-n 1000)
    TESTS=()
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, note how it ended
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (at most $limit s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    tail -n 30 "$OUT/$name.log"
}

"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
    | tee -a "$OUT/summary.txt"

# shellcheck disable=SC2086  # $MODELS and $SPEED are word lists
part bench 200 "$PY" bench.py --device "$DEVICE" --amp bf16 --models $MODELS --steps 20 --batch-size $BATCH \
    --msd-steps 10 --teacher-models $MODELS --teacher-batch $TEACHER_BATCH --repeats $REPEATS $SPEED \
    --json "$OUT/bench_gpu.json"

part mini_teacher 110 "$PY" train_teacher.py "${MINI[@]}" --amp bf16 --channels-last --grid-every 100000 \
    --out "$WORK/teacher" --device "$DEVICE"
part mini_refiner 90 "$PY" train_refiner.py --teacher "$WORK/teacher/ckpt.pt" "${MINI_REFINER[@]}" --amp bf16 \
    --out "$WORK/refiner" --device "$DEVICE"
if grep -q "^error: --filter" "$OUT/mini_refiner.log"; then  # a young teacher: too few pairs pass the filter
    part mini_refiner_nofilter 90 "$PY" train_refiner.py --teacher "$WORK/teacher/ckpt.pt" "${MINI_REFINER[@]}" \
        --amp bf16 --filter 0 --out "$WORK/refiner" --device "$DEVICE"
    sed -i 's/^mini_refiner: exit 2/mini_refiner: too few pairs passed --filter (exit 2), so retried with --filter 0;/' \
        "$OUT/summary.txt"
fi
cp "$WORK/refiner/metrics.json" "$OUT/mini_metrics.json" 2>/dev/null
cp "$WORK/refiner/regimes.png" "$OUT/mini_regimes.png" 2>/dev/null
cp "$WORK"/teacher/samples_*.png "$OUT/" 2>/dev/null

part tests 100 "$PY" -m pytest -q -p no:cacheprovider -m device --device "$DEVICE" "${TESTS[@]}" tests

echo "results in $OUT (summary.txt, *.log, bench_gpu.json, mini_metrics.json)"
! grep -qv ": exit 0 after" <(grep ": exit" "$OUT/summary.txt")
