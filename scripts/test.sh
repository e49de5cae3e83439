#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then run the whole suite with ctest. GPU tests skip
# themselves visibly when no GPU is present. Exit code: ctest's.
#
#   scripts/test.sh                    the suite as built by scripts/setup.sh, in $BUILD_DIR (default build)
#   scripts/test.sh --sanitize         the CPU suite built with ASan + UBSan (-DDSV3_SANITIZE=ON, CUDA off) in
#                                      $SANITIZE_BUILD_DIR (default $BUILD_DIR-sanitize); any sanitizer report fails
#   scripts/test.sh [--sanitize] -- <ctest args>   e.g. -- -R '^common' to run a part of it
#
# Under --sanitize, ASan stops at its first report (halt_on_error) and LeakSanitizer is on (detect_leaks=1): a
# leak is a finding too. UBSan reports are fatal at compile time (-fno-sanitize-recover=undefined) and print a
# stack. A report makes its test fail through the exit code; reports from processes a test starts and whose exit
# code it checks only loosely are caught too: the run fails when the ctest log holds any sanitizer report.
# ASan reserves terabytes of address space for its shadow memory, so the bad-input suite's address-space cap
# (BAD_INPUTS_VMEM_KB, 07_train_gpu/tests/bad_inputs.sh) is off here; ASan's own limit takes its place: one
# allocation over 8 GiB fails (std::bad_alloc, allocator_may_return_null=1) as it would under that cap. The programs
# run about 5x slower under ASan (06_full_model --config: 5.5 s plain, 28 s sanitized), so that suite's "hang"
# limit per program run is 150 s here instead of 30 (BAD_INPUTS_TIMEOUT, when not set already).
# Set DSV3_SANITIZE_OPTIONS to append to ASAN_OPTIONS (e.g. detect_leaks=0 to look past a leak).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
SANITIZE=0
CTEST_ARGS=()
while (($#)); do
  case "$1" in
    --sanitize) SANITIZE=1 ;;
    --) shift; CTEST_ARGS=("$@"); break ;;
    *) echo "test: error: unknown argument '$1' (known: --sanitize, -- <ctest args>)" >&2; exit 2 ;;
  esac
  shift
done
JOBS=$(nproc 2>/dev/null || echo 2)

if ((!SANITIZE)); then
  scripts/setup.sh
  exec ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$JOBS" --timeout 600 "${CTEST_ARGS[@]}"
fi

SAN_DIR=${SANITIZE_BUILD_DIR:-$BUILD_DIR-sanitize}
BUILD_DIR=$SAN_DIR CMAKE_ARGS="${CMAKE_ARGS:-} -DDSV3_CUDA=OFF -DDSV3_SANITIZE=ON" scripts/setup.sh
ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:check_initialization_order=1:strict_init_order=1"
ASAN_OPTIONS+=":max_allocation_size_mb=8192:allocator_may_return_null=1"
export ASAN_OPTIONS+="${DSV3_SANITIZE_OPTIONS:+:$DSV3_SANITIZE_OPTIONS}"
export BAD_INPUTS_VMEM_KB=0
export BAD_INPUTS_TIMEOUT=${BAD_INPUTS_TIMEOUT:-150}
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
echo "test: sanitized suite in $SAN_DIR (ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS)"
rc=0
ctest --test-dir "$SAN_DIR" --output-on-failure -j"$JOBS" --timeout 1200 "${CTEST_ARGS[@]}" || rc=$?
log="$SAN_DIR/Testing/Temporary/LastTest.log"
pattern='ERROR: (AddressSanitizer|LeakSanitizer)|runtime error: |SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer)'
if [[ -f $log ]] && grep -Eq "$pattern" "$log"; then
  echo "test: sanitizer reports in $log:" >&2
  grep -En "$pattern" "$log" | head -40 >&2
  ((rc)) || rc=1
fi
exit $rc
