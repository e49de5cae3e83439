#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then run the whole suite with ctest. GPU tests skip
# themselves visibly when no GPU is present. Exit code: ctest's.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
scripts/setup.sh
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$(nproc 2>/dev/null || echo 2)" --timeout 600
