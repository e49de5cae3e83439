#!/usr/bin/env bash
# Build the libFuzzer targets of fuzz/ and run each for a bounded time over its seed corpus (fuzz/corpus/<target>)
# and its regression inputs (fuzz/regressions/<target>). Fails on any finding: an exception other than
# dsv3::UserError, a crash, an ASan/UBSan/LeakSanitizer report, an input slower than 10 s, or more than 2 GB.
#
#   scripts/fuzz.sh [seconds] [target...]   seconds per target (default 25), targets default to all (fuzz/fuzz_*.cpp)
#   scripts/fuzz.sh --make-seeds            rebuild and rewrite the checked-in seed corpus (fuzz/make_seeds.cpp)
#
# Build: clang 14 (scripts/setup.sh --fuzz installs it), CUDA off, in $FUZZ_BUILD_DIR (default build-fuzz). New
# inputs the fuzzer finds go to $FUZZ_BUILD_DIR/corpus/<target> (kept between runs, never into the repository);
# findings to $FUZZ_BUILD_DIR/findings/<target>/crash-*, oom-*, timeout-*, leak-*. To keep a finding as a
# regression input: copy it to fuzz/regressions/<target>/<what-it-is> (fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${FUZZ_BUILD_DIR:-build-fuzz}
SECONDS_PER_TARGET=25
MAKE_SEEDS=0
TARGETS=()
for arg in "$@"; do
  case "$arg" in
    --make-seeds) MAKE_SEEDS=1 ;;
    ''|*[!0-9]*) TARGETS+=("$arg") ;;
    *) SECONDS_PER_TARGET=$arg ;;
  esac
done
if ((${#TARGETS[@]} == 0)); then
  for f in fuzz/fuzz_*.cpp; do t=${f#fuzz/fuzz_}; TARGETS+=("${t%.cpp}"); done
fi
for t in "${TARGETS[@]}"; do
  [[ -f fuzz/fuzz_$t.cpp ]] || { echo "fuzz: error: no target '$t' (fuzz/fuzz_$t.cpp)" >&2; exit 2; }
done

scripts/setup.sh --fuzz --packages-only
for tool in clang-14 clang++-14; do
  command -v "$tool" >/dev/null || { echo "fuzz: error: $tool not found (scripts/setup.sh --fuzz installs it)" >&2; exit 2; }
done
# -O1 and assertions on: the usual fuzzing build (fast to compile, every assert is a check more)
mkdir -p "$B"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O1 \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DDSV3_CUDA=OFF -DDSV3_SANITIZE=OFF -DDSV3_FUZZ=ON \
  >"$B/configure.log" 2>&1 || { tail -30 "$B/configure.log"; exit 1; }
cmake --build "$B" -j"$(nproc 2>/dev/null || echo 2)" --target dsv3_fuzz

if [[ -x /usr/lib/llvm-14/bin/llvm-symbolizer ]]; then export ASAN_SYMBOLIZER_PATH=/usr/lib/llvm-14/bin/llvm-symbolizer; fi
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

if ((MAKE_SEEDS)); then
  rm -rf fuzz/corpus
  "$B/fuzz/fuzz_make_seeds" fuzz/corpus
  exit
fi
# The checked-in seeds should still load with today's readers (a format change makes them shallow): warn only.
seeds_tmp=$(mktemp -d)
"$B/fuzz/fuzz_make_seeds" "$seeds_tmp" >"$B/make_seeds.log" 2>&1 ||
  echo "fuzz: warning: some seeds no longer load (fuzz/make_seeds.cpp; $B/make_seeds.log): run scripts/fuzz.sh --make-seeds" >&2
rm -rf "$seeds_tmp"

# Longest input per target: room around its largest seed.
max_len() {
  case "$1" in
    checkpoint) echo 16384 ;;
    prepared_data|tokens) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

declare -A RESULT EXECS
failed=0
for t in "${TARGETS[@]}"; do
  work="$B/corpus/$t" art="$B/findings/$t/" log="$B/fuzz_$t.log"
  mkdir -p "$work" "$art" "fuzz/corpus/$t" "fuzz/regressions/$t"
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s (log $log)"
  rc=0
  # the first folder receives new inputs; the checked-in seeds and regression inputs are read
  "$B/fuzz/fuzz_$t" -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" -rss_limit_mb=2048 \
    -timeout=10 -dict="fuzz/dicts/$t.dict" -artifact_prefix="$art" -print_final_stats=1 \
    "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" >"$log" 2>&1 || rc=$?
  EXECS[$t]=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
  if ((rc == 0)); then
    RESULT[$t]="clean"
  else
    RESULT[$t]="FINDING (rc $rc)"
    failed=1
    echo "fuzz: $t: finding (exit code $rc); the report:" >&2
    grep -E -A40 '^==[0-9]+==ERROR|runtime error:|fuzz invariant broken|terminate called|deadly signal|Test unit written' \
      "$log" | head -80 >&2
  fi
done

echo
printf '%-16s %12s  %s\n' target executions result
for t in "${TARGETS[@]}"; do printf '%-16s %12s  %s\n' "$t" "${EXECS[$t]}" "${RESULT[$t]}"; done
((failed == 0)) || echo "fuzz: findings saved under $B/findings/ (logs $B/fuzz_<target>.log)" >&2
exit $failed
