#!/usr/bin/env bash
# One prepared GPU benchmark run: install the package, check the device, run the speed
# benchmarks (kernel_rates, pretrain_speed, meta_train_speed, meta_test_speed) for resnet12
# at 84x84 and conv4 (plus a torch.compile pass and the evaluation speed-up when the shared
# miniImageNet copy is present), and write JSON lines to $OUT/gpu_results.jsonl (when OUT
# is set) or benchmarks/gpu_results.jsonl.
#
#   bash benchmarks/gpu.sh                                   # on a GPU machine
#   DEVICE=cpu BACKBONES=conv4@16 EXTRA=--quick bash benchmarks/gpu.sh   # CPU fallback test
#   python benchmarks/speed_table.py benchmarks/gpu_results.jsonl        # markdown rows
#
# Environment: PYTHON (interpreter), DEVICE (cuda | cpu; cuda falls back to cpu with a
# warning when no GPU is visible), BACKBONES, SPEED (which speed benchmarks, default all
# four), EXTRA (more flags for them, see benchmarks/timing.py),
# SKIP_INSTALL=1 (use the current environment as is), COMPILE and EVAL (1 or 0: the
# torch.compile pass and the evaluation speed-up; default 1 on CUDA, 0 on the CPU).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BACKBONES=${BACKBONES:-"resnet12@84 conv4@28 conv4@84"}
SPEED=${SPEED:-"kernel_rates pretrain_speed meta_train_speed meta_test_speed"}
EXTRA=${EXTRA:-}
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    RESULTS="$OUT/gpu_results.jsonl"
else
    RESULTS="benchmarks/gpu_results.jsonl"
fi
LOG="${RESULTS%.jsonl}.log"

# Install: the package editable, without reaching the network when torch is already there.
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    if ! "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
        echo "gpu.sh: editable install failed (see $LOG); using PYTHONPATH=src" >&2
    fi
    if ! "$PYTHON" -c "import torch, torchvision, numpy, PIL, yaml, tqdm, safetensors" 2>>"$LOG"; then
        "$PYTHON" -m pip install --quiet -e . >>"$LOG" 2>&1 \
            || echo "gpu.sh: could not install the dependencies (see $LOG)" >&2
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DEVICE" == cuda* ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: no CUDA device visible; falling back to the CPU" >&2
    DEVICE=cpu
fi
ON_GPU=0
[[ "$DEVICE" == cuda* ]] && ON_GPU=1
COMPILE=${COMPILE:-$ON_GPU}
EVAL=${EVAL:-$ON_GPU}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1 || true

: >"$RESULTS"
for script in $SPEED; do
    # shellcheck disable=SC2086  # BACKBONES and EXTRA are word lists
    "$PYTHON" "benchmarks/$script.py" --device "$DEVICE" --backbones $BACKBONES --full $EXTRA \
        >>"$RESULTS" 2>>"$LOG"
done
if [[ "$COMPILE" == 1 ]]; then
    for script in pretrain_speed meta_train_speed meta_test_speed; do
        # shellcheck disable=SC2086
        "$PYTHON" "benchmarks/$script.py" --device "$DEVICE" --backbones ${BACKBONES%% *} \
            --compile --skip data metabatch $EXTRA >>"$RESULTS" 2>>"$LOG" \
            || echo "gpu.sh: the --compile pass of $script failed (see $LOG)" >&2
    done
fi
DATA_ROOT=${DATA_ROOT:-"$PWD/../shared/data/miniimagenet"}
if [[ "$EVAL" == 1 && -f "$DATA_ROOT/val.csv" ]]; then
    FULL=""
    [[ "$DEVICE" == cuda* ]] && FULL="--full --per-episode 5"
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/eval_speedup.py --device "$DEVICE" --root "$DATA_ROOT" $FULL \
        >>"$RESULTS" 2>>"$LOG" || echo "gpu.sh: the evaluation speed-up failed (see $LOG)" >&2
fi
echo "gpu.sh: $(wc -l <"$RESULTS") JSON lines in $RESULTS" >&2
