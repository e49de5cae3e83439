#!/usr/bin/env bash
# Set up nano-dsv3 on a Debian 12 machine: install the Debian packages that are missing (as root, or
# through sudo), then configure and build. CUDA is used when nvcc is found (/usr/local/cuda or PATH);
# without it everything builds and runs on the CPU path.
#
#   scripts/setup.sh            build into ./build
#   BUILD_DIR=... scripts/setup.sh
#   scripts/setup.sh --fuzz     also install the fuzzing toolchain (FUZZ_PACKAGES: clang 14, libFuzzer)
#   scripts/setup.sh --packages-only [--fuzz]   install what is missing, configure and build nothing
# Extra CMake options can be passed in CMAKE_ARGS, e.g. CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=89".
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
FUZZ=0
PACKAGES_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --fuzz) FUZZ=1 ;;
    --packages-only) PACKAGES_ONLY=1 ;;
    *) echo "setup: error: unknown argument '$arg' (known: --fuzz, --packages-only)" >&2; exit 2 ;;
  esac
done

# The project's dependencies (DESIGN.md §7). One list, here.
PACKAGES=(cmake ninja-build g++ pkg-config libeigen3-dev libfmt-dev libgtest-dev googletest
          nlohmann-json3-dev libcli11-dev libsentencepiece-dev sentencepiece gnuplot-nox
          fortunes bible-kjv)
# Only scripts/fuzz.sh (and so .ci/run) needs these: clang 14 with libFuzzer's runtime, and llvm-symbolizer for
# file:line in its reports. The plain build and scripts/test.sh [--sanitize] use g++ and never install them.
FUZZ_PACKAGES=(clang-14 libclang-rt-14-dev llvm-14)
if ((FUZZ)); then PACKAGES+=("${FUZZ_PACKAGES[@]}"); fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing missing Debian packages: ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo); else
    echo "setup: error: need root or sudo to install: ${missing[*]}" >&2; exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ((PACKAGES_ONLY)); then exit 0; fi

JOBS=$(nproc 2>/dev/null || echo 2)
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j"$JOBS"
