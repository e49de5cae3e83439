#!/usr/bin/env bash
# Our trainer against its PyTorch speed peer, side by side: `07_train_gpu bench` (the hand-written CUDA step) and
# `torch_reference.py bench` (the same model, loss and optimizer step written for speed in PyTorch: bf16 autocast,
# SDPA, torch._grouped_mm experts, fused AdamW, torch.compile) on the same preset's config.json, same batch,
# sequence length and step count, alternated RUNS times so that clock and thermal drift touch both alike. Prints a
# table of tokens/s per run, the medians, the ratio ours/torch and the peak memory of each.
# Needs a CUDA GPU and a python3 with torch (PYTHON=...; the GPU machine's). Exit code 1 when a run fails, 2 on a
# usage error, a missing torch or no GPU.
#   scripts/bench_vs_torch.sh [build-dir] [work-dir]
#   env: RUNS=3 PRESET=small BATCH=32 SEQ_LEN=512 STEPS=20 PYTHON=python3 TORCH_COMPILE=reduce-overhead
#        EXTRA_BENCH_ARGS= (added to our bench's flags)  SKIP_BUILD=1 (use the build as it is)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if (($# > 2)); then echo "usage: scripts/bench_vs_torch.sh [build-dir] [work-dir]" >&2; exit 2; fi
BUILD_DIR=${1:-build}
W=${2:-$(mktemp -d "${TMPDIR:-/tmp}/bench_vs_torch.XXXXXX")}
RUNS=${RUNS:-3} PRESET=${PRESET:-small} BATCH=${BATCH:-32} SEQ_LEN=${SEQ_LEN:-512} STEPS=${STEPS:-20}
PYTHON=${PYTHON:-python3} TORCH_COMPILE=${TORCH_COMPILE:-reduce-overhead} EXTRA_BENCH_ARGS=${EXTRA_BENCH_ARGS:-}
T07=$BUILD_DIR/07_train_gpu/07_train_gpu
for v in RUNS BATCH SEQ_LEN STEPS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench_vs_torch: error: $v=${!v} is not a positive integer" >&2; exit 2; }
done
nvidia-smi -L >/dev/null 2>&1 || { echo "bench_vs_torch: error: no GPU (nvidia-smi -L fails)" >&2; exit 2; }
"$PYTHON" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null ||
  { echo "bench_vs_torch: error: $PYTHON cannot import torch or sees no CUDA device" >&2; exit 2; }
mkdir -p "$W" || exit 2

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  echo "bench_vs_torch: building $T07 (log $W/build.log)"
  { cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release &&
    cmake --build "$BUILD_DIR" -j"$(nproc)" --target 07_train_gpu; } >"$W/build.log" 2>&1 ||
    { tail -20 "$W/build.log"; echo "bench_vs_torch: error: the build failed" >&2; exit 1; }
fi
[[ -x $T07 ]] || { echo "bench_vs_torch: error: $T07 not built" >&2; exit 2; }
"$T07" bench --preset "$PRESET" --write-config "$W/config.json" >"$W/write-config.log" 2>&1 ||
  { cat "$W/write-config.log"; echo "bench_vs_torch: error: $T07 bench --write-config failed" >&2; exit 1; }

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__)')
echo "bench_vs_torch: preset $PRESET, batch $BATCH, seq_len $SEQ_LEN, $STEPS timed steps, $RUNS runs each; $GPU;" \
  "torch $TORCH (compile $TORCH_COMPILE); work folder $W"

# the last line of a log that parses as a JSON object (both benches print one last; other lines may come first)
json_of() {
  python3 -c 'import json, sys
for line in reversed(open(sys.argv[1]).read().splitlines()):
    if line.startswith("{"):
        try:
            print(json.dumps(json.loads(line))); break
        except ValueError:
            pass' "$1"
}

failed=0
: >"$W/results.txt"  # one line per run and side: "ours|torch RUN JSON" (JSON empty when the run failed)
for ((r = 1; r <= RUNS; ++r)); do
  log=$W/ours-$r.log
  # shellcheck disable=SC2086  # EXTRA_BENCH_ARGS: several flags
  "$T07" bench --preset "$PRESET" --precision bf16 --batch "$BATCH" --seq-len "$SEQ_LEN" --steps "$STEPS" \
    $EXTRA_BENCH_ARGS >"$log" 2>&1 || { tail -5 "$log"; echo "bench_vs_torch: run $r of ours failed ($log)"; failed=1; }
  echo "ours $r $(json_of "$log")" >>"$W/results.txt"
  log=$W/torch-$r.log
  "$PYTHON" 07_train_gpu/torch_reference.py bench "$W/config.json" --batch "$BATCH" --seq-len "$SEQ_LEN" \
    --steps "$STEPS" --compile "$TORCH_COMPILE" >"$log" 2>&1 ||
    { tail -5 "$log"; echo "bench_vs_torch: run $r of torch failed ($log)"; failed=1; }
  echo "torch $r $(json_of "$log")" >>"$W/results.txt"
  echo "  run $r of $RUNS done"
done

# the table: tokens/s per run, the medians and their ratio, step time and peak memory of each side
python3 - "$W/results.txt" <<'PY' || failed=1
import json, statistics, sys
rows = {"ours": {}, "torch": {}}
for line in open(sys.argv[1]):
    who, run, text = (line.rstrip("\n").split(" ", 2) + [""])[:3]
    rows[who][int(run)] = json.loads(text) if text.strip() else None
def col(who, key):
    return [r[key] for r in rows[who].values() if r and r.get(key) is not None]
def cell(r):
    return f"{r['tokens_per_s']:15,.0f}" if r else f"{'failed':>15s}"
print(f"{'run':>6s} {'ours tokens/s':>15s} {'torch tokens/s':>15s}")
for run in sorted(rows["ours"]):
    print(f"{run:6d} {cell(rows['ours'][run])} {cell(rows['torch'].get(run))}")
mo, mt = col("ours", "tokens_per_s"), col("torch", "tokens_per_s")
if mo and mt:
    o, t = statistics.median(mo), statistics.median(mt)
    print(f"{'median':>6s} {o:15,.0f} {t:15,.0f}   ours/torch = {o / t:.3f}")
for who in ("ours", "torch"):
    ms, pk = col(who, "step_ms"), col(who, "peak_mem_gib")
    if ms:
        print(f"{who:>6s}: median step {statistics.median(ms):.3f} ms, peak memory "
              + (f"{max(pk):.3f} GiB" if pk else "-"))
PY
echo "GPU: $GPU; torch $TORCH; logs in $W"
if ((failed)); then echo "bench_vs_torch: FAILED (a run failed)"; fi
exit $failed
