#!/usr/bin/env bash
# The PyTorch oracle of the training step (07_train_gpu/torch_reference.py, an outside check of the hand-written
# backward): for the tiny and cpu presets a short CPU run makes a checkpoint (trained weights and routing biases),
# `07_train_gpu grads` writes one step's loss parts and every gradient, then 20 AdamW steps on the same windows — on
# the CPU, and on the GPU's fp32 path when there is one — and the reference recomputes them with autograd (oracle) and
# replays the steps (steps), with a verdict each.
# Needs a python3 with torch (PYTHON=...; not a dependency of the build or the test suite: Debian's python3-torch
# or the GPU machine's). Exit code 1 when a comparison fails, 2 when torch is missing.
#   scripts/torch_oracle.sh [build-dir] [work-dir]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
BUILD_DIR=${1:-build}
W=${2:-$(mktemp -d "${TMPDIR:-/tmp}/torch_oracle.XXXXXX")}
PYTHON=${PYTHON:-python3}
T07=$BUILD_DIR/07_train_gpu/07_train_gpu
[[ -x $T07 ]] || { echo "torch_oracle: error: $T07 not built (scripts/test.sh or cmake --build $BUILD_DIR)" >&2; exit 2; }
"$PYTHON" -c 'import torch' 2>/dev/null ||
  { echo "torch_oracle: error: $PYTHON cannot import torch (Debian: apt install python3-torch, PYTHON=/usr/bin/python3)" >&2; exit 2; }
mkdir -p "$W"
echo "torch_oracle: work folder $W; $("$PYTHON" -c 'import torch; print("torch", torch.__version__)')"

# data that needs no Debian text packages: the test suite's generated lyrics
python3 07_train_gpu/tests/bad_inputs_tool.py songs "$W/songs.txt" || exit 1
"$T07" prepare --no-default-corpus --lyrics "$W/songs.txt" --vocab 300 --data "$W/data" >"$W/prepare.log" 2>&1 ||
  { tail -5 "$W/prepare.log"; exit 1; }

devices=(cpu)
if nvidia-smi -L >/dev/null 2>&1; then devices+=(cuda); fi
failed=0
for preset in tiny cpu; do
  "$T07" train --data "$W/data" --run "$W/run-$preset" --preset "$preset" --device cpu --batch 4 --seq-len 32 \
    --steps 10 --warmup 2 --eval-every 5 >"$W/train-$preset.log" 2>&1 || { tail -5 "$W/train-$preset.log"; exit 1; }
  for device in "${devices[@]}"; do
    dump="$W/step-$preset-$device"
    "$T07" grads --checkpoint "$W/run-$preset/checkpoints/last" --data "$W/data" --device "$device" \
      --precision fp32 --batch 2 --seq-len 32 --steps 20 --lr 1e-3 --warmup 2 --dump "$dump" >"$dump.log" 2>&1 ||
      { tail -5 "$dump.log"; exit 1; }
    echo "== $preset, $device fp32: one step's loss parts and gradients, then 20 AdamW steps"
    "$PYTHON" 07_train_gpu/torch_reference.py oracle "$dump" | tee "$dump.oracle.log" | tail -2
    ((PIPESTATUS[0] == 0)) || failed=1
    "$PYTHON" 07_train_gpu/torch_reference.py steps "$dump" | tee "$dump.steps.log" | tail -1
    ((PIPESTATUS[0] == 0)) || failed=1
  done
done
if ((failed)); then echo "torch_oracle: FAILED"; else echo "torch_oracle: every dump matches PyTorch autograd"; fi
exit $failed
