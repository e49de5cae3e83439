#!/usr/bin/env bash
# The user's path, as the README's "Train on your own lyrics" section and 07 README's command lines give it, on a
# small file: your lyrics -> prepare (its own data folder; the default one is never replaced) -> train a few steps
# -> sample; fine-tuning with --init-from on data prepared with the model's tokenizer; global options on either
# side of the subcommand (same results); a short run fits its warm-up; `grads` writes a step for the PyTorch oracle;
# an unknown config field is an error naming it; every subcommand's --help shows its defaults. CPU only, about
# 15 s on 2 cores.
#
#   07_train_gpu/tests/user_path.sh <07_train_gpu executable>
set -uo pipefail
T07=${1:?usage: user_path.sh <07_train_gpu executable>}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d "${TMPDIR:-/tmp}/user_path.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W" || exit 1

failures=0
ok() { echo "  [ok] $*"; }
bad() { echo "  [FAIL] $*"; failures=$((failures + 1)); }
# run NAME CMD...: runs CMD, output in NAME.log; fails the test (and shows the log's end) on a non-zero exit
run() {
  local name=$1
  shift
  if "$@" >"$name.log" 2>&1; then ok "$name"; else bad "$name: exit $? ($*)"; tail -5 "$name.log"; fi
}
# expect2 NAME PATTERN CMD...: CMD must exit 2 with PATTERN (extended regex) in its error output
expect2() {
  local name=$1 pattern=$2 rc
  shift 2
  "$@" >"$name.log" 2>&1
  rc=$?
  if ((rc == 2)) && grep -Eq -e "$pattern" "$name.log"; then ok "$name (exit 2: $(grep -m1 error "$name.log" | cut -c1-150))"
  else bad "$name: exit $rc, wanted 2 and /$pattern/"; tail -3 "$name.log"; fi
}

# 1. your lyrics: a line holding only % ends a song, a blank line inside a song is a stanza break
python3 "$HERE/bad_inputs_tool.py" songs my_songs.txt || exit 1
printf '%%\nA song of two stanzas\nwith a second line\n\nand a chorus after\nthe blank line\n' >>my_songs.txt
python3 "$HERE/bad_inputs_tool.py" songs more_songs.txt || exit 1

# 2. prepare: a folder named for the file; <out>/data (the default corpus's) is not touched
run prepare "$T07" prepare --no-default-corpus --lyrics my_songs.txt --vocab 400
check() {  # check "what" test-command...
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
check "prepare --lyrics wrote out/07_train_gpu/data-my_songs, not out/07_train_gpu/data" \
  test -f out/07_train_gpu/data-my_songs/data.json -a ! -e out/07_train_gpu/data
check "81 songs read (80 + the one with stanzas)" grep -q "81 songs" prepare.log
expect2 prepare_other_songs_into_that_folder 'other songs.*--data' \
  "$T07" prepare --no-default-corpus --lyrics more_songs.txt --vocab 400 --data out/07_train_gpu/data-my_songs

# 3. train a few steps, global options after the subcommand (the README's order) and before it: the same run
TRAIN=(--data out/07_train_gpu/data-my_songs --device cpu --preset tiny --batch 4 --seq-len 32 --steps 8 --eval-every 4)
run train_out_after "$T07" train --out o1 "${TRAIN[@]}" --seed 7
run train_out_before "$T07" --out o2 --seed 7 train "${TRAIN[@]}"
check "--out/--seed after and before the subcommand: identical checkpoints" \
  cmp -s o1/run/checkpoints/best/model.safetensors o2/run/checkpoints/best/model.safetensors
check "a run of 8 steps fits its warm-up, with a note" grep -q "warm-up 50 -> 0 steps" train_out_after.log

# 4. sample, both orders
run sample_after "$T07" sample --out o1 --seed 5 --prompt "Love" --max-new-tokens 12
run sample_before "$T07" --seed 5 --out o1 sample --prompt "Love" --max-new-tokens 12
if diff <(grep -A1 -- '--- prompt' sample_after.log | sed 's/, [0-9.]* tokens\/s//') \
        <(grep -A1 -- '--- prompt' sample_before.log | sed 's/, [0-9.]* tokens\/s//') >/dev/null; then
  ok "sample --seed after and before the subcommand: the same text"
else bad "sample: the two orders differ"; fi

# 5. fine-tune: data prepared with the model's tokenizer, --init-from its best checkpoint
run prepare_with_tokenizer "$T07" prepare --no-default-corpus --lyrics more_songs.txt --tokenizer o1/run/tokenizer.model \
  --data o1/data-more
run fine_tune "$T07" train --out o1 --data o1/data-more --run o1/run-more --init-from o1/run/checkpoints/best \
  --device cpu --batch 4 --seq-len 32 --steps 4 --eval-every 2
run fresh "$T07" train --out o1 --data o1/data-more --run o1/run-fresh --preset tiny --device cpu --batch 4 --seq-len 32 \
  --steps 4 --eval-every 2
check "--init-from says where it starts" grep -q "starting from the weights of o1/run/checkpoints/best" fine_tune.log
ce1() { grep -m1 '^step 1/' "$1" | sed -E 's/.*\| ce ([0-9.]+) .*/\1/'; }
if awk -v a="$(ce1 fine_tune.log)" -v b="$(ce1 fresh.log)" 'BEGIN { exit !(a + 0.05 < b) }'; then
  ok "the fine-tuned run starts from a trained model: step 1 ce $(ce1 fine_tune.log) vs $(ce1 fresh.log) from scratch"
else bad "step 1 ce of the fine-tuned run $(ce1 fine_tune.log) is not below the fresh run's $(ce1 fresh.log)"; fi
run sample_fine_tuned "$T07" sample --checkpoint o1/run-more/checkpoints/best --prompt "Love" --max-new-tokens 8
run prepare_own_tokenizer "$T07" prepare --no-default-corpus --lyrics more_songs.txt --vocab 400 --data o1/data-own
expect2 init_from_other_tokenizer 'prepare --tokenizer' "$T07" train --data o1/data-own --run o1/x \
  --init-from o1/run/checkpoints/best --device cpu --steps 2 --batch 4 --seq-len 32
cp -r o1/run/checkpoints/best o1/copied-best
run fine_tune_copied "$T07" train --data o1/data-more --run o1/run-copied --init-from o1/copied-best --device cpu \
  --batch 4 --seq-len 32 --steps 2 --eval-every 2
check "--init-from a copied best/ compares its own tokenizer with the data's" \
  bash -c '! grep -q "only the vocabulary sizes are compared" fine_tune_copied.log'
expect2 init_from_and_preset '--preset.*--init-from' "$T07" train --data o1/data-more --run o1/y --preset tiny \
  --init-from o1/run/checkpoints/best --device cpu --steps 2
expect2 run_folder_taken 'add --resume.*--run' "$T07" train --out o1 "${TRAIN[@]}"

# 6. one step's losses and gradients for the PyTorch oracle (torch_reference.py oracle DIR; torch is not needed here)
run grads_dump "$T07" grads --checkpoint o1/run/checkpoints/best --data out/07_train_gpu/data-my_songs --device cpu \
  --batch 2 --seq-len 16 --dump step
check "grads --dump wrote config, weights, tokens, losses and gradients" \
  test -s step/config.json -a -s step/model.safetensors -a -s step/tokens.bin -a -s step/losses.json -a -s step/grads.safetensors
check "tokens.bin holds 2 x (16 + 1) int32" test "$(stat -c %s step/tokens.bin)" = 136
check "losses.json: total = ce + mtp + balance" python3 -c '
import json, sys
j = json.load(open("step/losses.json"))
sys.exit(abs(j["ce"] + j["mtp"] + j["balance"] - j["total"]) > 1e-6 * abs(j["total"]))'

# 7. an unknown config field is an error (DESIGN.md, section 6), naming the field
python3 - <<'PY'
import json
c = json.load(open("o1/run/checkpoints/best/config.json"))
c["n_routed_expert"] = 8
json.dump(c, open("typo.json", "w"))
PY
expect2 unknown_config_field "unknown field 'n_routed_expert'" "$T07" train --data out/07_train_gpu/data-my_songs \
  --run o1/z --preset typo.json --device cpu --steps 2
expect2 flag_named_in_errors '--warmup \(warmup_steps\)' "$T07" train --data out/07_train_gpu/data-my_songs --run o1/w \
  --device cpu --steps 10 --warmup 20

# 8. --help shows the defaults (each subcommand's flag with a known default value; CLI11 versions print them as
#    "=4096" or "[4096]", so only the value is looked for on the flag's line)
for pair in "prepare --vocab 4096" "train --steps 800" "sample --top-p 0.95" "eval --precision fp32" \
            "bench --seq-len 512" "grads --seq-len 32"; do
  read -r sub flag value <<<"$pair"
  "$T07" "$sub" --help >"help_$sub.log" 2>&1
  check "$sub --help shows $flag's default $value" grep -Eq -e "^ *$flag .*$value" "help_$sub.log"
done

if ((failures)); then echo "user_path: $failures check(s) FAILED"; exit 1; fi
echo "user_path: all checks passed"
