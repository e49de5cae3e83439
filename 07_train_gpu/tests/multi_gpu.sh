#!/usr/bin/env bash
# Several GPUs end to end (README "Several GPUs"), on a small lyrics file and the tiny preset in bf16:
#   one  (1 GPU, NCCL): `--nccl` (the launcher, one rank, NCCL inside the captured step) trains exactly as the
#        plain run: train.csv and val.csv equal in every column but the timings; `--nccl --expert-parallel` (the
#        rows sent to this rank and back through NCCL, experts on the grouped path) within bf16 tolerance of it.
#   two  (2 GPUs): `--gpus 2` with the same global batch as one GPU: every step's loss within bf16 tolerance of the
#        one-GPU run, plain data parallel and with the experts split across the GPUs (--expert-parallel); a
#        one-GPU checkpoint resumes on 2 GPUs (a different count) and goes on to the end.
# Exits 77 (ctest: skipped, visibly) where the GPUs or NCCL are missing.
#
#   07_train_gpu/tests/multi_gpu.sh <07_train_gpu executable> one|two
set -uo pipefail
T07=${1:?usage: multi_gpu.sh <07_train_gpu executable> one|two}
PART=${2:?usage: multi_gpu.sh <07_train_gpu executable> one|two}
HERE=$(cd "$(dirname "$0")" && pwd)
need=$([[ $PART == two ]] && echo 2 || echo 1)
have=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if ((have < need)); then echo "SKIP: needs $need GPU(s), this machine has $have"; exit 77; fi
if ! "$T07" --gpus 2 train --help >/dev/null 2>&1; then echo "SKIP: $T07 does not run"; exit 77; fi
W=$(mktemp -d "${TMPDIR:-/tmp}/multi_gpu.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W" || exit 1
export NCCL_NVLS_ENABLE=0

failures=0
ok() { echo "  [ok] $*"; }
bad() { echo "  [FAIL] $*"; failures=$((failures + 1)); }
run() {  # run NAME CMD...: output in NAME.log; a non-zero exit fails the test
  local name=$1
  shift
  if "$@" >"$name.log" 2>&1; then ok "$name"; else bad "$name: exit $? ($*)"; tail -8 "$name.log"; fi
}
# same_csv A B TOL: the rows of two CSVs equal, column by column, within TOL relative (timing columns skipped);
# with TOL > 0 (runs that round differently) the losses and norms only: MaxVio, a maximum over experts' integer
# loads, moves in steps when one token's choice differs
same_csv() {
  python3 - "$1" "$2" "$3" <<'PY'
import csv, sys
a, b, tol = list(csv.DictReader(open(sys.argv[1]))), list(csv.DictReader(open(sys.argv[2]))), float(sys.argv[3])
if len(a) != len(b): sys.exit(f"{len(a)} rows vs {len(b)}")
worst = (0.0, "")
for ra, rb in zip(a, b):
    for k in ra:
        if k in ("tokens_per_s", "elapsed_s"): continue
        if tol > 0 and k.startswith("maxvio"): continue
        x, y = float(ra[k]), float(rb[k])
        d = abs(x - y) / max(1.0, abs(x), abs(y))
        if d > worst[0]: worst = (d, f"step {ra['step']} {k}: {x} vs {y}")
print(f"    largest difference {worst[0]:.3g} {worst[1]}")
sys.exit(0 if worst[0] <= tol else f"above {tol}")
PY
}

python3 "$HERE/bad_inputs_tool.py" songs songs.txt || exit 1
run prepare "$T07" --out o prepare --no-default-corpus --lyrics songs.txt --vocab 400 --data o/data
TRAIN=(--data o/data --device cuda --precision bf16 --preset tiny --batch 8 --seq-len 64 --warmup 4 --patience 0)

if [[ $PART == one ]]; then
  if ! grep -q "nccl" <("$T07" --help 2>&1); then echo "SKIP: no --nccl"; exit 77; fi
  run plain "$T07" --out o train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/plain
  "$T07" --out o --nccl train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/nccl >nccl.log 2>&1
  rc=$?
  if ((rc != 0)) && grep -q "lacks\|no NCCL" nccl.log; then echo "SKIP: built without NCCL"; exit 77; fi
  if ((rc == 0)); then ok "--nccl (one rank through the launcher)"; else bad "--nccl: exit $rc"; tail -8 nccl.log; fi
  grep -q "data parallel on 1 GPUs" nccl.log && ok "the rank says it is data parallel" || bad "no 'data parallel' line"
  same_csv o/plain/train.csv o/nccl/train.csv 0 && ok "train.csv: the same steps" || bad "train.csv differs"
  same_csv o/plain/val.csv o/nccl/val.csv 0 && ok "val.csv: the same evaluations" || bad "val.csv differs"
  run nccl_ep "$T07" --out o --nccl --expert-parallel train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/nccl_ep
  grep -q "data + expert parallel on 1 GPUs" nccl_ep.log && ok "the rank says expert parallel" || bad "no 'expert parallel'"
  same_csv o/plain/train.csv o/nccl_ep/train.csv 0.02 && ok "--expert-parallel on one rank: losses within bf16 tolerance" \
    || bad "--expert-parallel on one rank: losses differ"
  run ep_bench "$T07" --out o --nccl --expert-parallel bench --preset tiny --batch 8 --seq-len 64 --steps 3 --warmup 1 \
    --exchange-timing
  grep -q "all-to-all .* ms, experts' products" ep_bench.log && ok "bench --exchange-timing: $(grep -o 'all-to-all.*' ep_bench.log)" \
    || bad "bench --exchange-timing printed no times"
  # the launcher: a rank's user error is the launcher's exit 2; a SIGINT to the launcher reaches the rank once, which
  # stops after its step, saves and exits 130, and so does the launcher; the run then resumes
  "$T07" --out o --nccl train --data o/no_such_data --run o/none >nodata.log 2>&1
  rc=$?
  ((rc == 2)) && grep -q "no prepared data" nodata.log && ok "a rank's user error: the launcher exits 2" \
    || bad "no data under --nccl: exit $rc"
  "$T07" --out o --nccl train "${TRAIN[@]}" --steps 2000 --eval-every 500 --run o/sig >sig.log 2>&1 &
  pid=$!
  for _ in $(seq 300); do [[ $(wc -l <o/sig/train.csv 2>/dev/null || echo 0) -gt 20 ]] && break; sleep 0.1; done
  kill -INT "$pid"
  wait "$pid"
  rc=$?
  ((rc == 130)) && [[ -f o/sig/checkpoints/last/trainer_state.json ]] && ok "SIGINT: exit 130, checkpoint saved" \
    || { bad "SIGINT to the launcher: exit $rc"; tail -5 sig.log; }
  run sig_resume "$T07" --out o --nccl train "${TRAIN[@]}" --steps 60 --eval-every 500 --run o/sig --resume
else
  run one_gpu "$T07" --out o train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/one
  run two_gpus "$T07" --out o --gpus 2 train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/two
  grep -q "data parallel on 2 GPUs" two_gpus.log && ok "rank 0 says 2 GPUs" || bad "no 'data parallel on 2 GPUs'"
  same_csv o/one/train.csv o/two/train.csv 0.02 && ok "2 GPUs: every step's losses within bf16 tolerance" \
    || bad "2 GPUs: losses differ from one GPU's"
  same_csv o/one/val.csv o/two/val.csv 0.02 && ok "2 GPUs: validation within bf16 tolerance" || bad "val differs"
  run two_gpus_ep "$T07" --out o --gpus 2 --expert-parallel train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/two_ep
  grep -q "data + expert parallel on 2 GPUs" two_gpus_ep.log && ok "rank 0 says expert parallel" || bad "no 'expert parallel'"
  same_csv o/one/train.csv o/two_ep/train.csv 0.02 && ok "2 GPUs, expert parallel: losses within bf16 tolerance" \
    || bad "2 GPUs, expert parallel: losses differ from one GPU's"
  run half "$T07" --out o train "${TRAIN[@]}" --steps 10 --eval-every 10 --run o/half
  run resume_on_two "$T07" --out o --gpus 2 train "${TRAIN[@]}" --steps 20 --eval-every 10 --run o/half --resume
  grep -q "^20," o/half/train.csv && ok "a one-GPU checkpoint resumed on 2 GPUs to step 20" || bad "no step 20"
  DSV3_GPUS=2 "$T07" --out o train --data o/data --device cuda --preset tiny --batch 7 --steps 2 --warmup 1 \
    --run o/bad >bad.log 2>&1
  rc=$?
  ((rc == 2)) && grep -q "not a multiple" bad.log && ok "DSV3_GPUS=2 with --batch 7: exit 2, named" \
    || bad "batch 7 on 2 GPUs: exit $rc"
fi
echo "$([[ $failures == 0 ]] && echo "all checks passed" || echo "$failures check(s) FAILED")"
exit $((failures > 0))
