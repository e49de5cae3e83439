#!/usr/bin/env bash
# The outside checks against Hugging Face transformers (06_full_model/check_transformers.py), on a machine with
# PyTorch and transformers (the GPU machine; never part of the build or the test suite):
#   1) random models exported by 06_full_model (tiny, small; each without and with YaRN): logits;
#   2) with a run folder: its best checkpoint's validation loss on the run's own val.bin windows, ours
#      (07_train_gpu eval, fp32) against transformers'.
# Prints one verdict line per check and exits non-zero when one fails.
#   scripts/check_transformers.sh [build-dir] [stage-07 out folder (holding run/ and data/)]
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build-gpu}
RUN_OUT=${2:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failed=0
verdict() { echo "check_transformers: $1: $2"; [[ $2 == ok* ]] || failed=1; }

for preset in tiny small; do
  for yarn in "" --export-yarn; do
    name="$preset${yarn:+ (YaRN)}"
    dir="$WORK/$preset$yarn"
    if ! "$BUILD_DIR"/06_full_model/06_full_model --export "$dir" --export-preset "$preset" $yarn >"$WORK/log" 2>&1; then
      cat "$WORK/log"; verdict "$name" "FAIL (export)"; continue
    fi
    python3 06_full_model/check_transformers.py "$dir" | tee "$WORK/out"
    verdict "$name" "$(tail -1 "$WORK/out")"
  done
done

if [[ -n $RUN_OUT ]]; then
  ckpt="$RUN_OUT/run/checkpoints/best"
  "$BUILD_DIR"/07_train_gpu/07_train_gpu --out "$RUN_OUT" eval --precision fp32 --checkpoint "$ckpt" \
    --data "$RUN_OUT/data" | tee "$WORK/eval"
  python3 06_full_model/check_transformers.py --checkpoint "$ckpt" --val "$RUN_OUT/data/val.bin" \
    --ours "$WORK/eval" | tee "$WORK/out"
  verdict "trained checkpoint $ckpt" "$(tail -1 "$WORK/out")"
fi
exit $failed
