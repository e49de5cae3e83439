#!/usr/bin/env bash
# Run the whole suite on a GPU machine (no package installs: the machine already holds the dependencies)
# and print one summary: passed / failed / skipped per label.
#   scripts/gpu_suite.sh [build-dir] [log-dir]
#
# With --compute-sanitizer[=TOOLS] (TOOLS: comma-separated compute-sanitizer tools, default memcheck,racecheck)
# it builds as above, then instead of the ctest run starts every GoogleTest binary (<stage>_test, common_test) once
# per tool under `compute-sanitizer --tool TOOL`, with only its GPU tests (the Cuda* suites, ctest label gpu), and
# writes one line per binary and tool (errors, hazards, the tests' own verdict) to <log-dir>/compute_sanitizer/
# summary.txt next to each run's full log. Exit code 1 when any run reports an error or a hazard or fails a test.
#   scripts/gpu_suite.sh --compute-sanitizer [build-dir] [log-dir]
#   scripts/gpu_suite.sh --compute-sanitizer=memcheck build-gpu
# Environment: COMPUTE_SANITIZER (the binary; default from PATH or /usr/local/cuda/bin), COMPUTE_SANITIZER_ARGS
# (extra arguments, e.g. "--leak-check full"), COMPUTE_SANITIZER_TIMEOUT (seconds per run, default 3600),
# COMPUTE_SANITIZER_FILTER (GoogleTest filter, default 'Cuda*:*/Cuda*'; racecheck over all of 07's GPU tests takes
# more than 10 minutes on an H200, so a short look can pick some, e.g. 'CudaTrainBackend.Fp32MatchesCpu').
# Tests that make a CUDA API call fail on purpose (DELIBERATE_API_ERRORS below: CUDA_CHECK must throw with the
# file and line) run in a row of their own with --report-api-errors no, so that the API error they provoke does not
# count as a finding while a memory error or race in them still would.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
SANITIZER_TOOLS=""
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --compute-sanitizer) SANITIZER_TOOLS="memcheck,racecheck" ;;
    --compute-sanitizer=*) SANITIZER_TOOLS="${arg#--compute-sanitizer=}" ;;
    -*) echo "gpu_suite: error: unknown option '$arg' (known: --compute-sanitizer[=memcheck,racecheck])" >&2; exit 2 ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
BUILD_DIR=${POSITIONAL[0]:-build-gpu}
LOG_DIR=${POSITIONAL[1]:-$BUILD_DIR}

if [[ -n $SANITIZER_TOOLS ]]; then
  IFS=, read -r -a TOOLS <<<"$SANITIZER_TOOLS"
  for tool in "${TOOLS[@]}"; do
    case "$tool" in
      memcheck|racecheck|initcheck|synccheck) ;;
      *) echo "gpu_suite: error: unknown compute-sanitizer tool '$tool' (memcheck, racecheck, initcheck, synccheck)" >&2
         exit 2 ;;
    esac
  done
  # find compute-sanitizer before spending minutes on the build
  CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [[ -z $CS && -n $d && -x $d/bin/compute-sanitizer ]] && CS=$d/bin/compute-sanitizer
  done
  if [[ -z $CS || ! -x $CS ]]; then
    echo "gpu_suite: error: compute-sanitizer not found (looked in PATH, \$CUDA_HOME/bin and /usr/local/cuda/bin;" \
         "it ships with the CUDA toolkit): set COMPUTE_SANITIZER=/path/to/compute-sanitizer" >&2
    exit 2
  fi
fi

mkdir -p "$LOG_DIR"
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >"$LOG_DIR/configure.log" 2>&1 \
  || { tail -30 "$LOG_DIR/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j"$(nproc)" >"$LOG_DIR/build.log" 2>&1 || { grep -E "error|Error" "$LOG_DIR/build.log" | head -40; exit 1; }

# ---- compute-sanitizer pass: every test binary, its GPU tests only, once per tool ---------------------------
run_compute_sanitizer() {
  local out="$LOG_DIR/compute_sanitizer" summary rc=0 exe name tool log status errors hazards verdict passed ran=0 excluded
  mkdir -p "$out"
  summary="$out/summary.txt"
  "$CS" --version 2>&1 | head -3 >"$summary"
  printf '%-40s %-10s %8s %8s  %s\n' binary tool errors hazards tests >>"$summary"
  local filter=${COMPUTE_SANITIZER_FILTER:-'Cuda*:*/Cuda*'} deliberate="CudaBuffer.ErrorsThrowWithLocation"
  mapfile -t exes < <(find "$BUILD_DIR" -maxdepth 2 -type f -name '*_test' -perm -u+x | sort)
  if ((${#exes[@]} == 0)); then echo "gpu_suite: error: no *_test binaries under $BUILD_DIR" >&2; return 1; fi
  # one run: binary, tool, row label, gtest filter, extra sanitizer arguments
  sanitize_one() {
    local exe=$1 tool=$2 label=$3 gfilter=$4 extra=$5
    log="$out/$label.$tool.log"
    echo "gpu_suite: $tool $label (log $log)"
    # shellcheck disable=SC2086
    timeout "${COMPUTE_SANITIZER_TIMEOUT:-3600}" "$CS" --tool "$tool" --error-exitcode 99 $extra \
      ${COMPUTE_SANITIZER_ARGS:-} "$exe" --gtest_filter="$gfilter" >"$log" 2>&1
    status=$?
    # memcheck ends with "ERROR SUMMARY: N errors"; racecheck with "RACECHECK SUMMARY: H hazards displayed
    # (E errors, W warnings)"
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+$')
    [[ -z $errors ]] && errors=$(grep -Eo 'RACECHECK SUMMARY: .*\(([0-9]+) error' "$log" | tail -1 | grep -Eo '\([0-9]+' | tr -d '(')
    hazards=$(grep -Eo 'RACECHECK SUMMARY: [0-9]+ hazard' "$log" | tail -1 | grep -Eo '[0-9]+' | head -1)
    if grep -q '\[  FAILED  \]' "$log"; then verdict="FAILED"
    elif grep -q '\[  PASSED  \]' "$log"; then
      passed=$(grep -Eo '\[  PASSED  \] [0-9]+' "$log" | grep -Eo '[0-9]+$')
      ran=$((ran + passed))
      verdict="$passed passed"
      grep -q '\[  SKIPPED \]' "$log" && verdict+=", $(grep -Eo '\[  SKIPPED \] [0-9]+' "$log" | grep -Eo '[0-9]+$') skipped"
    elif ((status == 124)); then verdict="TIMEOUT"
    else verdict="no result (exit $status)"; fi
    if [[ $verdict == "0 passed" && -n ${COMPUTE_SANITIZER_FILTER:-} && $status == 0 ]]; then
      printf '%-40s %-10s %8s %8s  %s\n' "$label" "$tool" - - "no test matches the filter" >>"$summary"
      return
    fi
    printf '%-40s %-10s %8s %8s  %s\n' "$label" "$tool" "${errors:-?}" "${hazards:--}" "$verdict" >>"$summary"
    if ((status != 0)) || [[ -z $errors || $errors != 0 || ${hazards:-0} != 0 || $verdict != *passed* ]]; then rc=1; fi
  }
  for exe in "${exes[@]}"; do
    name=$(basename "$exe")
    for tool in "${TOOLS[@]}"; do
      # GoogleTest filter syntax: positive patterns, then one '-' before the negative ones
      if [[ $filter == *-* ]]; then excluded="$filter:$deliberate"; else excluded="$filter-$deliberate"; fi
      sanitize_one "$exe" "$tool" "$name" "$excluded" ""
      if [[ $name == common_test && -z ${COMPUTE_SANITIZER_FILTER:-} ]]; then
        sanitize_one "$exe" "$tool" "$name.$deliberate" "$deliberate" "--report-api-errors no"
      fi
    done
  done
  if ((ran == 0)); then
    echo "no GPU test ran under the sanitizer (every Cuda* test skipped: is there a GPU?)" >>"$summary"
    rc=1
  fi
  cat "$summary"
  ((rc == 0)) && echo "gpu_suite: compute-sanitizer clean (${TOOLS[*]})" || echo "gpu_suite: compute-sanitizer: see $summary" >&2
  return $rc
}

if [[ -n $SANITIZER_TOOLS ]]; then
  run_compute_sanitizer
  exit $?
fi

ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 600 --output-junit junit.xml >"$LOG_DIR/ctest.log" 2>&1
rc=$?
ctest --test-dir "$BUILD_DIR" --show-only=json-v1 >"$LOG_DIR/tests.json"
cp "$BUILD_DIR/junit.xml" "$LOG_DIR/junit.xml" 2>/dev/null || true
python3 scripts/summarize_ctest.py "$LOG_DIR/tests.json" "$BUILD_DIR/junit.xml"
grep -E "tests passed|FAILED|Failed|\(Failed\)|Timeout" "$LOG_DIR/ctest.log" | head -40
exit $rc
