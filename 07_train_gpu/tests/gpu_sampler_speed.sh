#!/usr/bin/env bash
# The GPU sampler's speed (issue 19, version 2 of the decode step), in one device call: build, the GPU tests of the
# decode paths, a lyrics model trained on the prepared data, then every GPU decode path (--gpu-decode v1, fused,
# full) on the same checkpoint: plain batch 1 and speculative (greedy and temperature 0.8, with the mean µs of each
# call), batch 16, GPU == CPU greedy, and the kernels of one captured step (ncu: count and durations).
# Usage (from the repository root of a checkout whose out/07_train_gpu/data holds prepared data):
#   bash 07_train_gpu/tests/gpu_sampler_speed.sh LOGDIR
# Everything is logged under LOGDIR; a summary is printed last. PATHS (default "v1 fused full"), TRAIN=0 (use
# CHECKPOINT instead of training), TRAIN_ARGS (extra train flags, e.g. --steps 250), TEMPS (default "0 0.8"), NCU=0
# (no profile), NCU_PATHS (default PATHS).
set -u
LOG=${1:?log folder}
mkdir -p "$LOG"
SRC=$(pwd)
B=${BUILD:-/tmp/b19h}
DATA=${DATA:-$SRC/out/07_train_gpu/data}
PATHS=${PATHS:-v1 fused full}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
stamp build
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv > "$LOG/gpu.txt" 2>&1
(cmake -S "$SRC" -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release \
  && cmake --build $B -j16 --target 07_train_gpu 07_train_gpu_test 02_mla_test 03_moe_test) > "$LOG/build.log" 2>&1 \
  || { stamp "BUILD FAILED"; grep -E "error" -A3 "$LOG/build.log" | head -40; exit 1; }
stamp tests
(cd $B && timeout 300 ctest -R 'Cuda(MlaDecode|MoeRows|Sampler)|07_train_gpu\.Sampler' --timeout 240 -j8) \
  > "$LOG/tests.log" 2>&1
grep -E "tests passed|tests failed" "$LOG/tests.log"
grep -E "\(Failed\)|\(SEGFAULT\)|\(Timeout\)|Exception" "$LOG/tests.log" | head -20
T07=$B/07_train_gpu/07_train_gpu
RUN=/tmp/o07/run
if [ "${TRAIN:-1}" = 1 ]; then
  stamp train
  timeout 240 $T07 --out /tmp/o07 train --data "$DATA" --run $RUN ${TRAIN_ARGS:-} > "$LOG/train.log" 2>&1 \
    || { stamp "TRAIN FAILED"; tail -20 "$LOG/train.log"; }
  tail -2 "$LOG/train.log"
fi
CK=${CHECKPOINT:-$RUN/checkpoints/best}
S=("$T07" --out /tmp/o07 sample --checkpoint $CK)
stamp samples
for p in $PATHS; do
  for temp in ${TEMPS:-0 0.8}; do
    timeout 120 "${S[@]}" --device cuda --gpu-decode $p --temperature $temp --max-new-tokens 300 --speculative \
      > "$LOG/spec_${p}_t$temp.txt" 2>&1
    timeout 60 "${S[@]}" --device cuda --gpu-decode $p --temperature $temp --max-new-tokens 300 --num-samples 16 \
      --prompt "Love is" > "$LOG/batch16_${p}_t$temp.txt" 2>&1
  done
  timeout 60 "${S[@]}" --device cuda --gpu-decode $p --temperature 0 --max-new-tokens 100 --print-ids \
    > "$LOG/greedy_gpu_$p.txt" 2>&1
done
timeout 120 "${S[@]}" --device cpu --temperature 0 --max-new-tokens 100 --print-ids > "$LOG/greedy_cpu.txt" 2>&1
if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
  stamp ncu
  # the first 240 kernels of a greedy run: the warm-up's first steps, replayed from the graph of a plain step
  for p in ${NCU_PATHS:-$PATHS}; do
    timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-count 240 \
      "${S[@]}" --device cuda --gpu-decode $p --temperature 0 --max-new-tokens 2 --prompt "Love is" \
      > "$LOG/ncu_$p.csv" 2> "$LOG/ncu_$p.err"
  done
fi
stamp summary
{
  echo "== tests"; grep -E "tests passed|tests failed" "$LOG/tests.log"
  for p in $PATHS; do
    echo "== $p"
    for temp in ${TEMPS:-0 0.8}; do
      echo "-- temperature $temp"
      grep -E "speculative overall|GPU calls|identical" "$LOG/spec_${p}_t$temp.txt" | sed 's/^/  /'
      grep -E "samples \(" "$LOG/batch16_${p}_t$temp.txt" | sed 's/^/  batch16: /'
    done
    diff <(grep '^ids:' "$LOG/greedy_gpu_$p.txt") <(grep '^ids:' "$LOG/greedy_cpu.txt") > /dev/null \
      && echo "  greedy ids: GPU ($p) == CPU (3 prompts x 100)" || echo "  greedy ids: GPU ($p) and CPU DIFFER"
  done
  for p in ${NCU_PATHS:-$PATHS}; do
    [ -s "$LOG/ncu_$p.csv" ] && python3 "$SRC/07_train_gpu/tests/ncu_step.py" "$LOG/ncu_$p.csv" --label $p
  done
} | tee "$LOG/summary.txt"
stamp done
