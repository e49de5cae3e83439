#!/usr/bin/env bash
# Run the whole suite on a GPU machine (no package installs: the machine already holds the dependencies)
# and print one summary: passed / failed / skipped per label.
#   scripts/gpu_suite.sh [build-dir] [log-dir]
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build-gpu}
LOG_DIR=${2:-$BUILD_DIR}
mkdir -p "$LOG_DIR"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >"$LOG_DIR/configure.log" 2>&1 \
  || { tail -30 "$LOG_DIR/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j"$(nproc)" >"$LOG_DIR/build.log" 2>&1 || { grep -E "error|Error" "$LOG_DIR/build.log" | head -40; exit 1; }
ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 600 --output-junit junit.xml >"$LOG_DIR/ctest.log" 2>&1
rc=$?
ctest --test-dir "$BUILD_DIR" --show-only=json-v1 >"$LOG_DIR/tests.json"
cp "$BUILD_DIR/junit.xml" "$LOG_DIR/junit.xml" 2>/dev/null || true
python3 scripts/summarize_ctest.py "$LOG_DIR/tests.json" "$BUILD_DIR/junit.xml"
grep -E "tests passed|FAILED|Failed|\(Failed\)|Timeout" "$LOG_DIR/ctest.log" | head -40
exit $rc
