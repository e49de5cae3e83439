#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then run every stage's demo, writing tables to the terminal and
# CSV + PNG diagnostics under out/<stage>/. (From stage 07 on, this trains the model and samples lyrics.)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
scripts/setup.sh
for demo in "$BUILD_DIR"/[0-9][0-9]_*/[0-9][0-9]_*; do
  [[ -x $demo && $demo != *_test ]] || continue
  name=$(basename "$demo")
  echo; echo "===== $name ====="
  "$demo" --out "out/$name"
done
