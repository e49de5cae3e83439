#!/usr/bin/env bash
# Kill -9 and resume (issue 21): a CPU run that evaluates and saves its checkpoints at every step is killed with SIGKILL
# at spread-out moments (so some kills land inside the checkpoint write and swap), resumed each time, and must end
# bitwise identical to the same run left alone: the same model.safetensors and optimizer.safetensors bytes, the
# same step. Also counts the checkpoint folders each kill left (last, last.old, last.tmp) to show which windows
# were hit.
#
#   07_train_gpu/tests/kill_resume.sh <07_train_gpu executable> [kills, default 12]
set -uo pipefail
T07=${1:?usage: kill_resume.sh <07_train_gpu executable> [kills]}
KILLS=${2:-12}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d "${TMPDIR:-/tmp}/kill_resume.XXXXXX")
trap 'rm -rf "$W"' EXIT

fail() { echo "kill_resume: FAILED: $*" >&2; exit 1; }

python3 "$HERE/bad_inputs_tool.py" songs "$W/songs.txt" || fail "could not write the lyrics file"
"$T07" --out "$W/p" prepare --no-default-corpus --lyrics "$W/songs.txt" --vocab 300 --data "$W/p/data" >"$W/prepare.log" 2>&1 ||
  fail "prepare: $(tail -3 "$W/prepare.log")"
STEPS=60
ARGS=(--out "$W/o" train --data "$W/p/data" --device cpu --precision fp32 --preset tiny --batch 4 --seq-len 32
      --steps "$STEPS" --warmup 5 --eval-every 1)

"$T07" "${ARGS[@]}" --run "$W/straight" >"$W/straight.log" 2>&1 || fail "uninterrupted run: $(tail -3 "$W/straight.log")"

# the same run, killed and resumed; delays spread over 0.2 .. 1.4 s (a step of this run takes a few ms on the CPU,
# a checkpoint write a good part of it)
declare -A LEFT=()
kills=0 resumes=0
first=1
for ((i = 0; i < KILLS; ++i)); do
  if ((first)); then resume=(); else resume=(--resume); resumes=$((resumes + 1)); fi
  "$T07" "${ARGS[@]}" --run "$W/killed" "${resume[@]}" >>"$W/killed.log" 2>&1 &
  pid=$!
  sleep "$(awk -v i="$i" 'BEGIN { printf "%.3f", 0.2 + (i * 0.37) % 1.2 }')"
  if kill -KILL "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null
    kills=$((kills + 1))
  else
    wait "$pid"
    rc=$?
    ((rc == 0)) || fail "run $i ended with exit code $rc before it was killed: $(tail -3 "$W/killed.log")"
  fi
  [[ -d $W/killed/checkpoints/last || -d $W/killed/checkpoints/last.old || -d $W/killed/checkpoints/last.tmp ||
     -d $W/killed/checkpoints/best ]] && first=0
  state=""
  for s in last last.old last.tmp; do [[ -d $W/killed/checkpoints/$s ]] && state+="$s "; done
  LEFT["${state:-none}"]=$((${LEFT["${state:-none}"]:-0} + 1))
done
# finish the run
if ((first)); then resume=(); else resume=(--resume); resumes=$((resumes + 1)); fi
"$T07" "${ARGS[@]}" --run "$W/killed" "${resume[@]}" >>"$W/killed.log" 2>&1 ||
  fail "the final resume: $(tail -5 "$W/killed.log")"

for f in model.safetensors optimizer.safetensors; do
  cmp -s "$W/straight/checkpoints/last/$f" "$W/killed/checkpoints/last/$f" ||
    fail "last/$f differs from the uninterrupted run's"
done
grep -q "\"step\": $STEPS" "$W/killed/checkpoints/last/trainer_state.json" || fail "the resumed run did not end at step $STEPS"
for s in last.old last.tmp; do [[ ! -e $W/killed/checkpoints/$s ]] || fail "$s left behind"; done

echo "kill_resume: $kills SIGKILLs, $resumes resumes; the last checkpoint's folders after each of the $KILLS runs:"
for k in "${!LEFT[@]}"; do printf '  %-24s %d\n' "$k" "${LEFT[$k]}"; done
echo "kill_resume: the killed-and-resumed run ends bitwise identical to the uninterrupted one (step $STEPS)"
