#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then stage 07's default run: prepare the lyrics corpus and tokenizer
# (once), train the full model (the "lyrics" preset in bf16 on the GPU; without a GPU the smaller "cpu" preset),
# and print lyrics sampled from the best checkpoint. Outputs (data, run folder with CSVs, plots and
# checkpoints) go under out/07_train_gpu/.
#   scripts/run.sh --all-demos   first runs every earlier stage's demo too (tables, CSVs and plots in out/<stage>/)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
scripts/setup.sh
if [[ ${1:-} == --all-demos ]]; then
  for demo in "$BUILD_DIR"/0[1-6]_*/0[1-6]_*; do
    [[ -x $demo && $demo != *_test ]] || continue
    name=$(basename "$demo")
    echo; echo "===== $name ====="
    "$demo" --out "out/$name"
  done
elif [[ -n ${1:-} ]]; then
  echo "usage: scripts/run.sh [--all-demos]" >&2
  exit 2
fi
echo; echo "===== 07_train_gpu: prepare, train, sample ====="
"$BUILD_DIR"/07_train_gpu/07_train_gpu --out out/07_train_gpu
