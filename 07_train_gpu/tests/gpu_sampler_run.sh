#!/usr/bin/env bash
# Issue 19's device run, in one call: build, the GPU tests of the decode path, a lyrics model trained on the prepared
# data, our samples (CPU and GPU, greedy and temperature 0.8, plain, speculative and batched), and the transformers
# check. Usage (from the repository root of a checkout whose out/07_train_gpu/data holds prepared data):
#   bash 07_train_gpu/tests/gpu_sampler_run.sh LOGDIR
# Everything is logged under LOGDIR; a summary is printed last.
set -u
LOG=${1:?log folder}
mkdir -p "$LOG"
SRC=$(pwd)
B=/tmp/b19
DATA=${DATA:-$SRC/out/07_train_gpu/data}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
stamp build
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv > "$LOG/gpu.txt" 2>&1
# TARGETS: what to build (default everything); HF_SPEED: new tokens of each timed transformers generate (0: none)
(cmake -S "$SRC" -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build $B -j16 ${TARGETS:+--target $TARGETS}) \
  > "$LOG/build.log" 2>&1 \
  || { stamp "BUILD FAILED"; tail -30 "$LOG/build.log"; exit 1; }
stamp tests
(cd $B && ctest -R 'Cuda(MlaDecode|MoeRows|Sampler)|CudaMla\.|CudaMoe\.' --timeout 300 -j4) > "$LOG/tests.log" 2>&1
tail -4 "$LOG/tests.log"
grep -E "Failed|\*\*\*" "$LOG/tests.log" | head -20
T07=$B/07_train_gpu/07_train_gpu
RUN=/tmp/o07/run
stamp train
$T07 --out /tmp/o07 train --data "$DATA" --run $RUN > "$LOG/train.log" 2>&1 || { stamp "TRAIN FAILED"; tail -20 "$LOG/train.log"; }
tail -2 "$LOG/train.log"
CK=$RUN/checkpoints/best
S=("$T07" --out /tmp/o07 sample --checkpoint $CK)
stamp samples
"${S[@]}" --device cuda --temperature 0 --max-new-tokens 100 --print-ids > "$LOG/greedy_gpu.txt" 2>&1
"${S[@]}" --device cpu --temperature 0 --max-new-tokens 100 --print-ids > "$LOG/greedy_cpu.txt" 2>&1
diff <(grep '^ids:' "$LOG/greedy_gpu.txt") <(grep '^ids:' "$LOG/greedy_cpu.txt") > /dev/null \
  && echo "greedy ids: GPU == CPU (3 prompts x 100)" || echo "greedy ids: GPU and CPU DIFFER"
for temp in 0 0.8; do
  "${S[@]}" --device cuda --temperature $temp --max-new-tokens 300 --speculative > "$LOG/spec_t$temp.txt" 2>&1
  grep -E "speed-up|overall|GPU calls" "$LOG/spec_t$temp.txt"
  "${S[@]}" --device cuda --temperature $temp --max-new-tokens 300 --num-samples 16 --prompt "Love is" > "$LOG/batch16_t$temp.txt" 2>&1
  grep -E "samples \(" "$LOG/batch16_t$temp.txt"
done
"${S[@]}" --device cpu --temperature 0.8 --max-new-tokens 100 --num-samples 2 --prompt "Love is" --print-ids > "$LOG/sampled_cpu.txt" 2>&1
"${S[@]}" --device cuda --temperature 0.8 --max-new-tokens 100 --num-samples 2 --prompt "Love is" --print-ids > "$LOG/sampled_gpu.txt" 2>&1
diff <(grep '^ids:' "$LOG/sampled_gpu.txt") <(grep '^ids:' "$LOG/sampled_cpu.txt") > /dev/null \
  && echo "temperature 0.8, 2 samples x 100: GPU == CPU" || echo "temperature 0.8: GPU and CPU differ (see sampled_*.txt)"
stamp transformers
PYTHONUNBUFFERED=1 python3 07_train_gpu/check_generate.py --checkpoint $CK --ours "$LOG/greedy_gpu.txt" --speed-tokens ${HF_SPEED:-100} > "$LOG/check_generate.txt" 2>&1
grep -E "equal|DIFFER|tokens/s|FAIL|ok$|Error" "$LOG/check_generate.txt" | head -20
stamp done
