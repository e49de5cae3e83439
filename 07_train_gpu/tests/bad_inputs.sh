#!/usr/bin/env bash
# The bad-input suite (issue 21): every hostile input a careful user could hand the command-line programs must end
# with a clear error on stderr naming the problem and exit code 2 -- never a signal (crash), a hang, exit 1
# ("internal error"), or exit 0 on wrong data. A few inputs are legal but hostile (a learning rate that makes the
# loss explode, a half-done checkpoint swap, a signal): those must end cleanly as documented.
#
#   07_train_gpu/tests/bad_inputs.sh [path/to/07_train_gpu [path/to/06_full_model]]
#
# Executables: the arguments, else $DSV3_TRAIN_EXE / $DSV3_FULL_MODEL_EXE, else build/... (ctest passes them).
# Environment: BAD_INPUTS_FILTER=ERE  run only the cases whose "category/name" matches
#              BAD_INPUTS_TIMEOUT=30  seconds per program run; a run that takes longer is a "hang"
#              BAD_INPUTS_VMEM_KB=N   address-space cap of each run (default 8 GiB without a GPU, off with one;
#                                     0 = off), so that an unbounded allocation fails instead of paging the machine
#              BAD_INPUTS_JOBS=N      categories run in parallel (default: the number of cores)
#              BAD_INPUTS_KEEP=1      keep the work folder (every case's stdout/stderr under log/)
# Fixtures are made by the programs themselves in a temporary folder: a lyrics file (bad_inputs_tool.py songs), a
# prepared data folder (vocab 300), a tiny 6-step CPU run with best/last checkpoints, then copies of them are
# damaged one way each. Needs bash, coreutils (timeout, mkfifo) and python3 (standard library) for the file surgery.
#
# Each case is one of: clean (exit 2 and the message fragments on stderr, or the documented clean end),
# crash (killed by a signal), hang (timeout), accepted (exit 0 on bad input, or a non-finite checkpoint written),
# wrong-code (any other exit code, e.g. 1 "internal error", or exit 2 without the message).
# The summary counts them per category; the exit code is 1 when any case is not clean.
# shellcheck disable=SC2034  # D, F, TK, C, L0KV, UP3 are read by the eval'd mutations
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
T07=${1:-${DSV3_TRAIN_EXE:-$ROOT/build/07_train_gpu/07_train_gpu}}
T06=${2:-${DSV3_FULL_MODEL_EXE:-$ROOT/build/06_full_model/06_full_model}}
TIMEOUT=${BAD_INPUTS_TIMEOUT:-30}
FILTER=${BAD_INPUTS_FILTER:-}
KEEP=${BAD_INPUTS_KEEP:-0}
HAVE_GPU=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && HAVE_GPU=1
if ((HAVE_GPU)); then VMEM=${BAD_INPUTS_VMEM_KB:-0}; else VMEM=${BAD_INPUTS_VMEM_KB:-8388608}; fi

for exe in "$T07" "$T06"; do
  [[ -x $exe ]] || { echo "bad_inputs: executable not found: $exe (build it, or pass its path)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "bad_inputs: python3 is needed for the file surgery" >&2; exit 1; }
command -v timeout >/dev/null || { echo "bad_inputs: coreutils timeout is needed" >&2; exit 1; }
# the interpreter itself (a version manager's shim costs ~0.3 s a call), without site packages (-S: faster, and
# only the standard library is used)
PY=$(python3 -c 'import sys; print(sys.executable)')
TOOL=("$PY" -S "$HERE/bad_inputs_tool.py")

# every path the programs may print is neutral (digits, no word a message fragment could match): the work folder,
# the fixtures (d1 d2 r1 ...) and each case's copy (c/k<checksum of the case>)
W=${TMPDIR:-/tmp}/bad_inputs.$$
rm -rf "$W"
mkdir -p "$W" || exit 1
trap '[[ $KEEP == 1 ]] && echo "work folder kept: $W" || rm -rf "$W"' EXIT
mkdir -p "$W/log" "$W/c"
T_START=$SECONDS

# ---------------------------------------------------------------------------------------------------------------
# bookkeeping: one line per case in results.tsv (category, name, status), the details of every case that is not
# clean in fail/<category>.txt; categories run as parallel jobs, so nothing is kept in shell variables
RESULTS=$W/results.tsv
mkdir -p "$W/fail"
: >"$RESULTS"
CATEGORIES=(control checkpoint config trainer_state data tokenizer flags swap signals)

selected() { [[ -z $FILTER ]] || [[ $1 =~ $FILTER ]]; }

# record CAT NAME STATUS LOGPREFIX EXPECTATION CMD...
record() {
  local cat=$1 name=$2 st=$3 pre=$4 want=$5
  shift 5
  printf '%s\t%s\t%s\n' "$cat" "$name" "$st" >>"$RESULTS"
  printf '  %-10s %s/%s\n' "$st" "$cat" "$name"
  [[ $st == clean ]] && return 0
  {
    printf '=== %s/%s: %s (exit %s)\n' "$cat" "$name" "$st" "$RC"
    printf '  want: %s\n' "$want"
    printf '  cmd: '
    printf '%q ' "$@"
    printf '\n'
    if [[ -n $pre && -f $pre.err ]]; then
      sed -n '1,6p' "$pre.err" | cut -c1-400 | sed 's/^/  stderr| /'
      grep -av '^seed [0-9]*$' "$pre.out" | tail -n 4 | cut -c1-300 | sed 's/^/  stdout| /'
    fi
    [[ -n ${NOTE:-} ]] && printf '  note: %s\n' "$NOTE"
  } >>"$W/fail/$cat.txt"
  NOTE=
}

# run_prog LOGPREFIX CMD...: runs CMD with the timeout and the memory cap, stdin closed (or the file $STDIN);
# sets RC and HUNG.
run_prog() {
  local pre=$1
  shift
  local t0=$SECONDS
  (
    ((VMEM > 0)) && ulimit -v "$VMEM"
    exec timeout -k 5 "$TIMEOUT" "$@"
  ) >"$pre.out" 2>"$pre.err" <"${STDIN:-/dev/null}"
  RC=$?
  printf '%s\t%s\n' "$((SECONDS - t0))" "${pre##*/}" >>"$W/times.tsv"
  HUNG=0
  if ((RC == 124)) || { ((RC == 137)) && ((SECONDS - t0 >= TIMEOUT)); }; then HUNG=1; fi
}

# status of a run that should have failed: the usual classes; "" when it exited 2 (the caller checks the message)
fail_class() {
  if ((HUNG)); then echo hang; elif ((RC > 128)); then echo crash; elif ((RC == 0)); then echo accepted
  elif ((RC == 2)); then echo ""; else echo wrong-code; fi
}

# errtext FILE: stderr without the program's name ("07_train_gpu: error: "), which would match "train" or "gpu"
errtext() { sed -E 's/^[^ ]*(07_train_gpu|06_full_model): (internal )?error: //' "$1"; }

logname() { echo "$W/log/${1//\//.}.${2//\//.}"; }

# expect2 CAT NAME ERE... -- CMD...: exit 2, and every ERE (case-insensitive) found on stderr.
expect2() {
  local cat=$1 name=$2
  shift 2
  local pats=()
  while [[ $1 != -- ]]; do pats+=("$1"); shift; done
  shift
  selected "$cat/$name" || return 0
  suite_error "$cat" "$name" "$@" && return 0
  local pre
  pre=$(logname "$cat" "$name")
  run_prog "$pre" "$@"
  local st
  st=$(fail_class)
  if [[ -z $st ]]; then
    st=clean
    for p in "${pats[@]}"; do errtext "$pre.err" | grep -Eaqi -- "$p" || { st=wrong-code; NOTE="stderr lacks /$p/"; }; done
  fi
  local want
  want=$(printf '/%s/ ' "${pats[@]}")
  record "$cat" "$name" "$st" "$pre" "exit 2, stderr matching $want" "$@"
}

# all_finite DIR: every model.safetensors / optimizer.safetensors under DIR holds only finite values
all_finite() {
  local f bad=0
  while IFS= read -r f; do
    "${TOOL[@]}" finite "$f" >>"$W/finite.log" 2>&1 || { bad=1; NOTE="$(tail -n 1 "$W/finite.log")"; }
  done < <(find "$1" -name '*.safetensors' 2>/dev/null)
  return $bad
}

# expect_end CAT NAME RUNDIR -- CMD...: a legal but hostile input: exit 0 or 2 (with a message), never a signal
# or a hang, and no checkpoint under RUNDIR (if given) with a non-finite value.
expect_end() {
  local cat=$1 name=$2 rundir=$3
  shift 4
  selected "$cat/$name" || return 0
  suite_error "$cat" "$name" "$@" && return 0
  local pre st
  pre=$(logname "$cat" "$name")
  run_prog "$pre" "$@"
  if ((HUNG)); then st=hang; elif ((RC > 128)); then st=crash
  elif ((RC == 0)) || { ((RC == 2)) && [[ -s $pre.err ]]; }; then
    st=clean
    [[ -n $rundir ]] && ! all_finite "$rundir" && st=accepted
  else st=wrong-code; fi
  record "$cat" "$name" "$st" "$pre" "exit 0 or 2 (with a message), no signal, no non-finite checkpoint" "$@"
}

# expect0 CAT NAME ERE... -- CMD...: must succeed (exit 0) and print every ERE (stdout or stderr).
expect0() {
  local cat=$1 name=$2 pats=() p
  shift 2
  while [[ $1 != -- ]]; do pats+=("$1"); shift; done
  shift
  selected "$cat/$name" || return 0
  suite_error "$cat" "$name" "$@" && return 0
  local pre st
  pre=$(logname "$cat" "$name")
  run_prog "$pre" "$@"
  if ((HUNG)); then st=hang; elif ((RC > 128)); then st=crash
  elif ((RC == 0)); then
    st=clean
    for p in "${pats[@]}"; do
      cat "$pre.out" "$pre.err" | grep -Eaq -- "$p" || { st=wrong-code; NOTE="output lacks /$p/"; }
    done
  else st=wrong-code; fi
  record "$cat" "$name" "$st" "$pre" "exit 0, output matching$(printf ' /%s/' "${pats[@]}")" "$@"
}

# ---------------------------------------------------------------------------------------------------------------
# fixtures, made by the programs themselves
setup_step() {
  local name=$1
  shift
  run_prog "$W/log/setup.$name" "$@"
  if ((RC != 0)); then
    echo "bad_inputs: fixture step '$name' failed (exit $RC): $*" >&2
    tail -n 20 "$W/log/setup.$name.out" "$W/log/setup.$name.err" >&2
    exit 1
  fi
}

echo "bad_inputs: $T07 | $T06 | timeout ${TIMEOUT}s | vmem cap ${VMEM} KiB | work $W"
"${TOOL[@]}" songs "$W/songs.txt"
DATA=$W/d1   # vocab 300
DATA2=$W/d2  # vocab 320: another tokenizer
RUN=$W/r1    # best and last at step 6
LAST3=$W/r3  # the last checkpoint at step 3 of the same run
O=$W/o1      # --out of every case (the programs write nothing there we look at)
setup_step prepare "$T07" --out "$W/p1" prepare --no-default-corpus --lyrics "$W/songs.txt" --vocab 300 --data "$W/p1/data"
setup_step prepare2 "$T07" --out "$W/p2" prepare --no-default-corpus --lyrics "$W/songs.txt" --vocab 320 --data "$W/p2/data"
mv "$W/p1/data" "$DATA"
mv "$W/p2/data" "$DATA2"
TF=(--device cpu --precision fp32 --preset tiny --batch 2 --seq-len 16 --warmup 1 --eval-every 3)
setup_step train3 "$T07" --out "$O" train --data "$DATA" --run "$RUN" "${TF[@]}" --steps 3
cp -a "$RUN/checkpoints/last" "$LAST3"
setup_step train6 "$T07" --out "$O" train --data "$DATA" --run "$RUN" "${TF[@]}" --steps 6 --resume
for f in "$RUN/checkpoints/best/model.safetensors" "$RUN/checkpoints/last/model.safetensors"; do
  [[ -f $f ]] || { echo "bad_inputs: fixture run lacks $f" >&2; exit 1; }
done
echo "bad_inputs: fixtures ready in $((SECONDS - T_START)) s"

# mkrun NAME: a fresh copy of the fixture run; prints its path
# kpath NAME: the neutral path of a case's copy
kpath() { echo "$W/c/k$(printf '%s' "$1" | cksum | cut -d' ' -f1)"; }
mkrun() {
  local d
  d=$(kpath "$1")
  rm -rf "$d"
  cp -a "$RUN" "$d"
  echo "$d"
}
mkdata() {
  local d
  d=$(kpath "$1.data")
  rm -rf "$d"
  cp -a "$DATA" "$d"
  echo "$d"
}
SAMPLE=("$T07" --out "$O" sample --prompt love --max-new-tokens 4 --checkpoint)  # + checkpoint folder
EVAL=("$T07" --out "$O" eval --device cpu --data "$DATA" --checkpoint)             # + checkpoint folder
RESUME=("$T07" --out "$O" train --data "$DATA" "${TF[@]}" --steps 9 --resume --run)  # + run folder
TRAIN=("$T07" --out "$O" train --data "$DATA")                                    # + flags
NEWRUN=("$T07" --out "$O" train "${TF[@]}" --steps 2)                              # + --data D --run R

# ckpt_case CAT NAME PROGS 'MUTATION on $D' ERE... : for each program of PROGS (sample eval resume), a fresh run
# copy whose checkpoint (best for sample/eval, last for resume) the bash MUTATION damages, then expect2. For resume
# the run's best is removed, so that no intact checkpoint is left to fall back to (swap/damaged_latest tests that).
ckpt_case() {
  local cat=$1 name=$2 progs=$3 mut=$4
  shift 4
  local prog r D
  for prog in $progs; do
    selected "$cat/$name.$prog" || continue
    r=$(mkrun "$cat.$name.$prog")
    case $prog in
      sample) D=$r/checkpoints/best; mutate "$mut"; expect2 "$cat" "$name.$prog" "$@" -- "${SAMPLE[@]}" "$D" ;;
      eval) D=$r/checkpoints/best; mutate "$mut"; expect2 "$cat" "$name.$prog" "$@" -- "${EVAL[@]}" "$D" ;;
      resume) D=$r/checkpoints/last; rm -rf "$r/checkpoints/best"; mutate "$mut"; expect2 "$cat" "$name.$prog" "$@" -- "${RESUME[@]}" "$r" ;;
    esac
  done
}
# ckpt_end: as ckpt_case, but the input is legal (finite) and hostile: expect_end (resume: no non-finite checkpoint)
ckpt_end() {
  local cat=$1 name=$2 progs=$3 mut=$4
  local prog r D
  for prog in $progs; do
    selected "$cat/$name.$prog" || continue
    r=$(mkrun "$cat.$name.$prog")
    case $prog in
      sample) D=$r/checkpoints/best; mutate "$mut"; expect_end "$cat" "$name.$prog" "" -- "${SAMPLE[@]}" "$D" ;;
      eval) D=$r/checkpoints/best; mutate "$mut"; expect_end "$cat" "$name.$prog" "" -- "${EVAL[@]}" "$D" ;;
      resume) D=$r/checkpoints/last; rm -rf "$r/checkpoints/best"; mutate "$mut"; expect_end "$cat" "$name.$prog" "$r/checkpoints" -- "${RESUME[@]}" "$r" ;;
    esac
  done
}
st() { "${TOOL[@]}" "$@"; }
js() { "${TOOL[@]}" json-set "$@"; }
nr() { local d; d=$(kpath "$1.run"); rm -rf "$d"; echo "$d"; }  # a new run folder path
# mutate 'BASH': builds a damaged input; when it fails (a bug of the suite), MUT_ERR makes the next case a failure
MUT_ERR=
mutate() {
  local log=$W/mutate.$BASHPID.log
  (set -e; eval "$1") >"$log" 2>&1 || MUT_ERR="could not build the input: $(tail -n 1 "$log")"
}
# suite_error CAT NAME CMD...: records the case whose input could not be built
suite_error() {
  [[ -z $MUT_ERR ]] && return 1
  RC=- NOTE=$MUT_ERR
  record "$1" "$2" wrong-code "" "(suite error)" "${@:3}"
  MUT_ERR=
  return 0
}
L0KV=model.layers.0.self_attn.kv_a_proj_with_mqa.weight
UP3=model.layers.1.mlp.experts.3.up_proj.weight
ALL3="sample eval resume"
SIZES='[0-9] ?(bytes|[KMGT]i?B).*[0-9] ?(bytes|[KMGT]i?B)'  # two sizes: needed and available
NOGPU='(no|not|without)[^.]*(GPU|CUDA)|(GPU|CUDA)[^.]*(not|unavailable|missing)'

# ---------------------------------------------------------------------------------------------------------------
cat_control() {
  echo "control: the undamaged fixtures work"
  expect0 control sample 'prompt' -- "${SAMPLE[@]}" "$RUN/checkpoints/best"
  expect0 control eval '"val_ce"' -- "${EVAL[@]}" "$RUN/checkpoints/best"
  r=$(mkrun control.resume)
  expect0 control resume 'resum.* at step 6[^0-9]' 'done: 9 steps' -- "${RESUME[@]}" "$r"
  expect0 control config06 'parameters|total' -- "$T06" --out "$W/o2" --config "$RUN/checkpoints/best/config.json"
}

# ---------------------------------------------------------------------------------------------------------------
cat_checkpoint() {
  echo "checkpoint: model.safetensors"
  MS='model\.safetensors'
  ckpt_case checkpoint model_missing "$ALL3" 'rm "$D/model.safetensors"' "$MS"
  ckpt_case checkpoint model_empty "$ALL3" ': >"$D/model.safetensors"' "$MS"
  ckpt_case checkpoint model_truncated "$ALL3" 'truncate -s 100000 "$D/model.safetensors"' "$MS"
  ckpt_case checkpoint model_7_bytes "$ALL3" 'truncate -s 7 "$D/model.safetensors"' "$MS"
  ckpt_case checkpoint model_garbage "$ALL3" 'yes "garbage bytes, not a safetensors file" | head -c 4096 >"$D/model.safetensors"' "$MS"
  ckpt_case checkpoint model_directory "$ALL3" 'rm "$D/model.safetensors"; mkdir "$D/model.safetensors"' "$MS"
  ckpt_case checkpoint model_dev_zero "$ALL3" 'ln -sf /dev/zero "$D/model.safetensors"' "$MS"
  ckpt_case checkpoint header_len_2e63 "$ALL3" 'st header-len "$D/model.safetensors" 9223372036854775807' "$MS" 'header'
  ckpt_case checkpoint header_len_past_eof "$ALL3" 'st header-len "$D/model.safetensors" 1000000' "$MS" 'header'
  ckpt_case checkpoint header_len_zero "$ALL3" 'st header-len "$D/model.safetensors" 0' "$MS" 'header'
  ckpt_case checkpoint header_not_json "$ALL3" 'st header-len "$D/model.safetensors" 100' "$MS" 'header|JSON'
  ckpt_case checkpoint offsets_past_eof "$ALL3" 'st offsets "$D/model.safetensors" lm_head.weight past-eof' 'lm_head'
  ckpt_case checkpoint offsets_reversed "$ALL3" 'st offsets "$D/model.safetensors" model.embed_tokens.weight reversed' 'embed_tokens'
  ckpt_case checkpoint offsets_overlap "$ALL3" 'st offsets "$D/model.safetensors" model.layers.0.self_attn.q_a_proj.weight overlap:model.embed_tokens.weight' 'overlap|collid|shared|q_a_proj'
  ckpt_case checkpoint offsets_u64_wrap "$ALL3" 'st offsets "$D/model.safetensors" lm_head.weight wrap' 'lm_head'
  ckpt_case checkpoint shape_2e61 "$ALL3" 'st set-entry "$D/model.safetensors" model.embed_tokens.weight shape "[2305843009213693952, 24]"' 'embed_tokens'
  ckpt_case checkpoint shape_2e61_1d "$ALL3" 'st set-entry "$D/model.safetensors" model.norm.weight shape "[2305843009213693952]"' 'model\.norm'
  ckpt_case checkpoint shape_negative "$ALL3" 'st set-entry "$D/model.safetensors" model.embed_tokens.weight shape "[-300, -24]"' 'embed_tokens'
  ckpt_case checkpoint shape_transposed "$ALL3" 'st set-entry "$D/model.safetensors" model.layers.0.self_attn.q_a_proj.weight shape "[24, 12]"' 'q_a_proj'
  ckpt_case checkpoint dtype_f16 "$ALL3" 'st set-entry "$D/model.safetensors" model.embed_tokens.weight dtype "\"F16\""' 'embed_tokens|F16|dtype'
  ckpt_case checkpoint dtype_unknown "$ALL3" 'st set-entry "$D/model.safetensors" model.embed_tokens.weight dtype "\"Q7\""' 'dtype|Q7'
  ckpt_case checkpoint tensor_missing "$ALL3" 'st remove "$D/model.safetensors" lm_head.weight' 'lm_head'
  ckpt_case checkpoint header_hole "$ALL3" 'st drop "$D/model.safetensors" lm_head.weight' 'hole|gap|lm_head|offset'
  ckpt_case checkpoint tensor_extra "$ALL3" 'st append "$D/model.safetensors" model.layers.0.bogus.weight' 'bogus'
  ckpt_case checkpoint tensor_extra_past_eof "$ALL3" 'st offsets "$D/model.safetensors" model.layers.0.bogus.weight extra' 'bogus'
  ckpt_case checkpoint nan_layer0_kv_a "$ALL3" 'st fill "$D/model.safetensors" $L0KV nan' 'kv_a_proj_with_mqa' 'non-finite|\bnan\b'
  ckpt_case checkpoint inf_embed_one "$ALL3" 'st fill "$D/model.safetensors" model.embed_tokens.weight inf 1' 'embed_tokens' 'non-finite|\binf\b|infinit'
  ckpt_case checkpoint nan_router_bias "$ALL3" 'st fill "$D/model.safetensors" model.layers.1.mlp.gate.e_score_correction_bias nan' 'e_score_correction_bias' 'non-finite|\bnan\b'
  ckpt_case checkpoint neg_inf_router "$ALL3" 'st fill "$D/model.safetensors" model.layers.1.mlp.gate.weight -inf' 'mlp\.gate' 'non-finite|\binf\b|infinit'
  ckpt_case checkpoint nan_mtp_head "$ALL3" 'st fill "$D/model.safetensors" model.layers.2.shared_head.head.weight nan 3' 'shared_head' 'non-finite|\bnan\b'
  ckpt_end checkpoint big_expert_up_3e38 "$ALL3" 'st fill "$D/model.safetensors" $UP3 3e38'
  ckpt_end checkpoint big_router_3e38 "$ALL3" 'st fill "$D/model.safetensors" model.layers.1.mlp.gate.weight -3e38'
  ckpt_end checkpoint big_embed_3e38 "$ALL3" 'st fill "$D/model.safetensors" re:embed_tokens 3e38'
  ckpt_case checkpoint config_missing "$ALL3" 'rm "$D/config.json"' 'config\.json'
  ckpt_case checkpoint config_other_model "$ALL3" 'st json-set "$D/config.json" hidden_size 32' 'hidden_size|shape|config'
  ckpt_case checkpoint folder_is_file "sample eval" 'rm -rf "$D"; echo x >"$D"' 'director|folder|no checkpoint'
  ckpt_case checkpoint folder_empty "$ALL3" 'rm -rf "$D"/*' 'model\.safetensors|config\.json|trainer_state|no checkpoint'

  echo "checkpoint: optimizer.safetensors (train --resume)"
  OS='optimizer\.safetensors'
  ckpt_case checkpoint opt_nan_embed_exp_avg resume 'st fill "$D/optimizer.safetensors" embed.exp_avg nan 1' 'embed\.exp_avg' 'non-finite|\bnan\b'
  ckpt_case checkpoint opt_negative_exp_avg_sq resume 'st fill "$D/optimizer.safetensors" embed.exp_avg_sq -1 1' 'exp_avg_sq' 'negative|< ?0|>= ?0'
  ckpt_case checkpoint opt_inf_head_exp_avg_sq resume 'st fill "$D/optimizer.safetensors" head.exp_avg_sq inf' 'head\.exp_avg_sq' 'non-finite|\binf\b|infinit'
  ckpt_case checkpoint opt_tensor_missing resume 'st remove "$D/optimizer.safetensors" head.exp_avg' 'head\.exp_avg'
  ckpt_case checkpoint opt_tensor_extra resume 'st append "$D/optimizer.safetensors" bogus.exp_avg' 'bogus'
  ckpt_case checkpoint opt_wrong_size resume 'st set-entry "$D/optimizer.safetensors" embed.exp_avg shape "[7199]"' 'embed\.exp_avg'
  ckpt_case checkpoint opt_missing resume 'rm "$D/optimizer.safetensors"' "$OS"
  ckpt_case checkpoint opt_empty resume ': >"$D/optimizer.safetensors"' "$OS"
  ckpt_case checkpoint opt_truncated resume 'truncate -s 50000 "$D/optimizer.safetensors"' "$OS"
  ckpt_case checkpoint opt_shape_2e61 resume 'st set-entry "$D/optimizer.safetensors" embed.exp_avg shape "[2305843009213693952]"' 'embed\.exp_avg'
}

# ---------------------------------------------------------------------------------------------------------------
cat_config() {
  echo "config.json (06_full_model --config, sample's checkpoint, train --preset)"
  BASECFG=$RUN/checkpoints/best/config.json
  # cfg_case NAME 'MUTATION on $F' ERE...: 06 --config F, sample with the checkpoint's config.json = F,
  # train --preset F (a new run)
  cfg_case() {
    local name=$1 mut=$2
    shift 2
    local F r
    if selected "config/$name.06"; then
      F=$(kpath "config.$name.06").json; rm -rf "$F"; cp "$BASECFG" "$F"; mutate "$mut"
      expect2 config "$name.06" "$@" -- "$T06" --out "$W/o2" --config "$F"
    fi
    if selected "config/$name.sample"; then
      r=$(mkrun "config.$name.sample"); F=$r/checkpoints/best/config.json; rm -f "$F"; cp "$BASECFG" "$F"; mutate "$mut"
      expect2 config "$name.sample" "$@" -- "${SAMPLE[@]}" "$r/checkpoints/best"
    fi
    if selected "config/$name.train"; then
      F=$(kpath "config.$name.train").json; rm -rf "$F"; cp "$BASECFG" "$F"; mutate "$mut"
      local nr
      nr=$(kpath "config.$name.train.run")
      rm -rf "$nr"
      expect2 config "$name.train" "$@" -- "$T07" --out "$O" train --data "$DATA" --run "$nr" --device cpu \
        --precision fp32 --preset "$F" --batch 2 --seq-len 16 --warmup 1 --eval-every 3 --steps 2
    fi
  }
  cfg_case hidden_2e32_plus_24 'js "$F" hidden_size 4294967320' 'hidden_size'
  cfg_case layers_2e32_plus_2 'js "$F" num_hidden_layers 4294967298' 'num_hidden_layers'
  cfg_case vocab_2e32_plus_300 'js "$F" vocab_size 4294967596' 'vocab_size'
  cfg_case hidden_2e64 'js "$F" hidden_size 18446744073709551640' 'hidden_size'
  cfg_case hidden_negative 'js "$F" hidden_size -24' 'hidden_size'
  cfg_case hidden_zero 'js "$F" hidden_size 0' 'hidden_size'
  cfg_case layers_zero 'js "$F" num_hidden_layers 0' 'num_hidden_layers'
  cfg_case hidden_float 'js "$F" hidden_size 24.5' 'hidden_size'
  cfg_case hidden_string 'js "$F" hidden_size "\"24\""' 'hidden_size'
  cfg_case hidden_1e400 'js "$F" hidden_size 1e400' 'hidden_size|1e400|range|overflow'
  cfg_case eps_1e400 'js "$F" rms_norm_eps 1e400' 'rms_norm_eps|1e400|range|overflow'
  cfg_case field_missing 'js "$F" kv_lora_rank 0; "${TOOL[@]}" json-del "$F" kv_lora_rank' 'kv_lora_rank'
  cfg_case field_unknown 'js "$F" hidden_sise 24' 'hidden_sise'
  cfg_case topk_over_experts 'js "$F" num_experts_per_tok 9' 'num_experts_per_tok'
  cfg_case groups_not_dividing 'js "$F" n_group 3' 'n_group'
  cfg_case topk_group_over_groups 'js "$F" topk_group 5' 'topk_group'
  cfg_case scoring_unknown 'js "$F" scoring_func "\"tanh\""' 'scoring_func'
  cfg_case eps_negative 'js "$F" rms_norm_eps -1' 'rms_norm_eps'
  cfg_case rope_theta_zero 'js "$F" rope_theta 0' 'rope_theta'
  cfg_case max_pos_zero 'js "$F" max_position_embeddings 0' 'max_position_embeddings'
  cfg_case first_dense_over_layers 'js "$F" first_k_dense_replace 5' 'first_k_dense_replace'
  cfg_case mtp_negative 'js "$F" num_nextn_predict_layers -1' 'num_nextn_predict_layers'
  cfg_case yarn_negative_factor 'js "$F" rope_scaling "{\"type\": \"yarn\", \"factor\": -4, \"original_max_position_embeddings\": 64}"' 'factor|rope_scaling'
  cfg_case empty ': >"$F"' 'config|JSON|empty'
  cfg_case not_json 'echo "hidden_size = 24" >"$F"' 'JSON'
  cfg_case json_array 'echo "[1, 2, 3]" >"$F"' 'object|JSON'
  cfg_case directory 'rm -f "$F"; mkdir -p "$F"' 'config|director|regular'
  cfg_case fifo 'rm -f "$F"; mkfifo "$F"' 'config|regular|fifo'
  cfg_case dev_zero_symlink 'rm -f "$F"; ln -s /dev/zero "$F"' 'config|regular|large|size'
  cfg_case binary_garbage 'head -c 3000 "$RUN/checkpoints/best/model.safetensors" | tail -c 2000 >"$F"' 'JSON'

  # sizes that do not fit: parameter counts must never be negative (06 --config), a huge config is refused or counted
  huge_case() {
    local name=$1 mut=$2
    selected "config/$name.06" || return 0
    local F pre st
    F=$(kpath "config.$name.06").json
    rm -f "$F"; cp "$BASECFG" "$F"; mutate "$mut"
    suite_error config "$name.06" "$T06" --out "$W/o2" --config "$F" && return 0
    pre=$(logname config "$name.06")
    run_prog "$pre" "$T06" --out "$W/o2" --config "$F"
    if ((HUNG)); then st=hang; elif ((RC > 128)); then st=crash
    elif ((RC == 2)) && errtext "$pre.err" | grep -Eqi 'too large|larger|overflow|range|exceed|at most'; then st=clean
    elif ((RC == 0)); then
      st=clean
      # the table of this config: a negative count, inf or nan is an overflow
      if grep -E '^[a-zA-Z ()/]+ +-?[0-9.]+ M' "$pre.out" | grep -Eq -- ' -[0-9]|inf|nan'; then
        st=accepted; NOTE="negative / non-finite parameter count printed"
      fi
    else st=wrong-code; fi
    record config "$name.06" "$st" "$pre" "exit 0 with correct (non-negative) counts, or exit 2 'too large'" \
      "$T06" --out "$W/o2" --config "$F"
  }
  huge_case huge_dims_int32_max 'for k in hidden_size intermediate_size moe_intermediate_size num_hidden_layers vocab_size n_routed_experts q_lora_rank kv_lora_rank; do js "$F" $k 2147483647; done'
  # counts far past 2^31 (and 2^32) but dimensions an implementation may accept: printed right, or refused
  huge_case huge_counts 'js "$F" hidden_size 65536; js "$F" moe_intermediate_size 65536; js "$F" intermediate_size 65536; js "$F" num_hidden_layers 1000; js "$F" n_routed_experts 256; js "$F" num_experts_per_tok 8; js "$F" n_group 8; js "$F" topk_group 4; js "$F" vocab_size 1000000'
  huge_case huge_vocab 'js "$F" vocab_size 2000000000; js "$F" hidden_size 2000000000'

  # max_position_embeddings 2^31-1: sample must not allocate a table that size (exit 0 or a clear 2, quickly)
  if selected "config/max_pos_2e31.sample"; then
    r=$(mkrun config.max_pos_2e31.sample)
    js "$r/checkpoints/best/config.json" max_position_embeddings 2147483647
    expect_end config max_pos_2e31.sample "" -- "${SAMPLE[@]}" "$r/checkpoints/best"
  fi
  if selected "config/max_pos_2e31.eval"; then
    r=$(mkrun config.max_pos_2e31.eval)
    js "$r/checkpoints/best/config.json" max_position_embeddings 2147483647
    expect_end config max_pos_2e31.eval "" -- "${EVAL[@]}" "$r/checkpoints/best"
  fi
}

# ---------------------------------------------------------------------------------------------------------------
cat_trainer_state() {
  echo "trainer_state.json (train --resume, eval)"
  # ts_case NAME 'MUTATION on $F' ERE...
  ts_case() {
    local name=$1 mut=$2
    shift 2
    ckpt_case trainer_state "$name" "resume eval" 'F=$D/trainer_state.json; '"$mut" "$@"
  }
  ts_case step_2e63_minus_1 'js "$F" step 9223372036854775807' 'step'
  ts_case step_2e63 'js "$F" step 9223372036854775808' 'step'
  ts_case step_2e64 'js "$F" step 18446744073709551616' 'step'
  ts_case step_beyond_max_steps 'js "$F" step 7; js "$F" updates 7' 'step'
  ts_case step_negative 'js "$F" step -1' 'step'
  ts_case step_string 'js "$F" step "\"6\""' 'step'
  ts_case step_float 'js "$F" step 6.5' 'step'
  ts_case step_null 'js "$F" step null' 'step'
  ts_case updates_missing '"${TOOL[@]}" json-del "$F" updates' 'updates'
  ts_case elapsed_negative 'js "$F" elapsed_s -5' 'elapsed'
  ts_case elapsed_1e400 'js "$F" elapsed_s 1e400' 'elapsed|1e400|range|overflow'
  ts_case evals_since_best_negative 'js "$F" evals_since_best -1' 'evals.since.best'
  ts_case skipped_absurd 'js "$F" skipped_steps 1000000000000' 'skipped'
  ts_case epoch_absurd 'js "$F" batcher.epoch 1000000000000000' 'epoch|batcher'
  ts_case cursor_negative 'js "$F" batcher.cursor -1' 'cursor|batcher'
  ts_case cursor_beyond_data 'js "$F" batcher.cursor 99999999' 'cursor|batcher'
  ts_case best_val_negative 'js "$F" best.val_ce -1' 'val.ce|best.val'
  ts_case best_step_beyond 'js "$F" best.step 99' 'best.step'
  ts_case batch_zero 'js "$F" train_config.batch 0' 'batch'
  ts_case seq_len_2e32 'js "$F" train_config.seq_len 4294967312' 'seq_len'
  ts_case lr_negative 'js "$F" train_config.lr -1' '\blr\b'
  ts_case train_config_missing '"${TOOL[@]}" json-del "$F" train_config' 'train_config'
  ckpt_case trainer_state other_data_vocab resume 'F=$D/trainer_state.json; js "$F" data.vocab_size 512' 'other data|vocab'
  ts_case format_version_2 'js "$F" format_version 2' 'format_version'
  ts_case empty ': >"$F"' 'trainer_state'
  ts_case not_json 'echo "step = 6" >"$F"' 'trainer_state|JSON'
  ts_case json_array 'echo "[]" >"$F"' 'trainer_state|object'
  ts_case missing 'rm "$F"' 'trainer_state'
  ts_case directory 'rm "$F"; mkdir "$F"' 'trainer_state'
  ts_case fifo 'rm "$F"; mkfifo "$F"' 'trainer_state'
}

# ---------------------------------------------------------------------------------------------------------------
cat_data() {
  echo "data (data.json, token files: train into a new run, eval)"
  # data_case NAME 'MUTATION on $DD (a data folder copy)' ERE...: train (new run) and eval on the damaged copy;
  # data_case_train: train only (eval reads only the validation split)
  data_case_train() { DATA_PROGS=train data_case "$@"; }
  data_case() {
    local name=$1 mut=$2 progs=${DATA_PROGS:-train eval}
    shift 2
    local DD
    if [[ $progs == *train* ]] && selected "data/$name.train"; then
      DD=$(mkdata "data.$name.train"); mutate "$mut"
      local rr
      rr=$(nr "data.$name.train")
      expect2 data "$name.train" "$@" -- "${NEWRUN[@]}" --data "$DD" --run "$rr"
    fi
    if [[ $progs == *eval* ]] && selected "data/$name.eval"; then
      DD=$(mkdata "data.$name.eval"); mutate "$mut"
      expect2 data "$name.eval" "$@" -- "$T07" --out "$O" eval --device cpu --data "$DD" --checkpoint "$RUN/checkpoints/best"
    fi
  }
  DJ='"$DD/data.json"'
  data_case val_bytes_wrong "js $DJ splits.val.bytes 5000" 'bytes'
  data_case train_bytes_wrong "js $DJ splits.train.bytes 99" 'bytes'
  data_case val_fraction_1e400 "js $DJ val_fraction 1e400" 'val_fraction|1e400|range|overflow'
  data_case eos_id_other "js $DJ eos_id 3" 'eos'
  data_case vocab_other "js $DJ vocab_size 512" 'vocab'
  data_case vocab_over_uint16 "js $DJ vocab_size 70000" 'vocab'
  data_case vocab_2e32 "js $DJ vocab_size 4294967596" 'vocab'
  data_case tokens_2e62 "js $DJ splits.train.tokens 4611686018427387904" 'tokens|train\.bin'
  data_case tokens_negative "js $DJ splits.val.tokens -1" 'tokens'
  data_case file_path "js $DJ splits.train.file '\"../d1/train.bin\"'" 'file.*(name|path)|\.\./'
  data_case file_nonexistent "js $DJ splits.val.file '\"nothing.bin\"'" 'nothing\.bin'
  data_case format_version_2 "js $DJ format_version 2" 'format_version'
  data_case json_missing 'rm "$DD/data.json"' 'data\.json'
  data_case json_empty ': >"$DD/data.json"' 'data\.json'
  data_case json_not_json 'echo "vocab_size: 300" >"$DD/data.json"' 'data\.json|JSON'
  data_case json_fifo 'rm "$DD/data.json"; mkfifo "$DD/data.json"' 'data\.json'
  data_case json_dev_zero 'rm "$DD/data.json"; ln -s /dev/zero "$DD/data.json"' 'data\.json'
  data_case val_truncated_one_token 's=$(stat -c %s "$DD/val.bin"); truncate -s $((s - 2)) "$DD/val.bin"' 'val\.bin'
  data_case val_odd_length 'printf "\x01" >>"$DD/val.bin"' 'val\.bin'
  data_case train_id_over_vocab 'printf "\xff\xff" | dd of="$DD/train.bin" conv=notrunc status=none' 'train\.bin' '\bid\b|vocab|range'
  data_case train_missing 'rm "$DD/train.bin"' 'train\.bin'
  data_case train_dev_zero 'rm "$DD/train.bin"; ln -s /dev/zero "$DD/train.bin"' 'train\.bin'
  data_case train_directory 'rm "$DD/train.bin"; mkdir "$DD/train.bin"' 'train\.bin'
  data_case folder_is_file 'rm -rf "$DD"; echo x >"$DD"' 'director|folder|data\.json'
  # data too short for a window
  data_case_train train_tiny_split "js $DJ splits.train.tokens 3; js $DJ splits.train.songs 1; js $DJ splits.train.lines 1; js $DJ splits.train.bytes 3; truncate -s 6 \"\$DD/train.bin\"" 'tokens|seq.len|too short|window'
}

# ---------------------------------------------------------------------------------------------------------------
cat_tokenizer() {
  echo "tokenizer.model (train into a new run, sample)"
  tok_case() {
    local name=$1 mut=$2
    shift 2
    local DD r
    if selected "tokenizer/$name.train"; then
      DD=$(mkdata "tok.$name.train"); local TK=$DD/tokenizer.model; mutate "$mut"
      local rr
      rr=$(nr "tok.$name.train")
      expect2 tokenizer "$name.train" "$@" -- "${NEWRUN[@]}" --data "$DD" --run "$rr"
    fi
    # sample reads the checkpoint's own copy, else the run folder's: both damaged
    if selected "tokenizer/$name.sample"; then
      r=$(mkrun "tok.$name.sample")
      for TK in "$r/tokenizer.model" "$r/checkpoints/best/tokenizer.model"; do mutate "$mut"; done
      expect2 tokenizer "$name.sample" "$@" -- "${SAMPLE[@]}" "$r/checkpoints/best"
    fi
  }
  tok_case garbage 'yes "not a sentencepiece model" | head -c 2000 >"$TK"' 'tokenizer'
  tok_case empty ': >"$TK"' 'tokenizer'
  tok_case wrong_vocab 'cp "$DATA2/tokenizer.model" "$TK"' 'tokenizer|vocab'
  tok_case missing 'rm "$TK"' 'tokenizer\.model'
  tok_case directory 'rm "$TK"; mkdir "$TK"' 'tokenizer'
  tok_case fifo 'rm "$TK"; mkfifo "$TK"' 'tokenizer'
  tok_case truncated 'truncate -s 1000 "$TK"' 'tokenizer'
  expect2 tokenizer flag_nonexistent 'tokenizer|nothing' -- "$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" \
    --tokenizer "$W/nothing.model" --prompt love --max-new-tokens 4
  expect2 tokenizer flag_wrong_vocab 'tokenizer|vocab' -- "$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" \
    --tokenizer "$DATA2/tokenizer.model" --prompt love --max-new-tokens 4
  # the checkpoint folder carries its tokenizer: the run folder's copy is not needed, a copied best alone samples,
  # its own copy wins over the run's (and is checked), an older folder without one falls back to the run's
  if selected "tokenizer/own_copy_wins"; then
    r=$(mkrun tok.own_copy_wins); TK=$r/tokenizer.model; mutate 'cp "$DATA2/tokenizer.model" "$TK"'
    expect0 tokenizer own_copy_wins "checkpoints/best/tokenizer.model \\(the checkpoint's own copy\\)" 'prompt' -- "${SAMPLE[@]}" "$r/checkpoints/best"
  fi
  if selected "tokenizer/best_alone"; then
    r=$(kpath tok.best_alone); rm -rf "$r"; mkdir -p "$r"; cp -a "$RUN/checkpoints/best" "$r/best"
    expect0 tokenizer best_alone "$r/best/tokenizer.model" 'prompt' -- "${SAMPLE[@]}" "$r/best"
  fi
  if selected "tokenizer/own_copy_wrong_vocab"; then
    r=$(mkrun tok.own_copy_wrong_vocab); TK=$r/checkpoints/best/tokenizer.model; mutate 'cp "$DATA2/tokenizer.model" "$TK"'
    expect2 tokenizer own_copy_wrong_vocab 'checkpoints/best/tokenizer\.model.*(320|vocab)' -- "${SAMPLE[@]}" "$r/checkpoints/best"
  fi
  if selected "tokenizer/old_checkpoint_without_one"; then
    r=$(mkrun tok.old_checkpoint_without_one); mutate 'rm "$r/checkpoints/best/tokenizer.model"'
    expect0 tokenizer old_checkpoint_without_one "run folder's copy" 'prompt' -- "${SAMPLE[@]}" "$r/checkpoints/best"
  fi
}

# ---------------------------------------------------------------------------------------------------------------
cat_flags() {
  echo "flags"
  expect2 flags train_precision_fp8_cpu 'precision|fp8' -- "${TRAIN[@]}" --run "$(nr p1)" --device cpu --precision fp8 --preset tiny --steps 2 --warmup 1
  expect2 flags train_precision_fp8_auto 'precision|fp8' -- "${TRAIN[@]}" --run "$(nr p2)" --precision fp8 --preset tiny --steps 2 --warmup 1
  expect2 flags eval_precision_fp8 'precision|fp8' -- "${EVAL[@]}" "$RUN/checkpoints/best" --precision fp8
  expect2 flags train_device_tpu 'device|tpu' -- "${TRAIN[@]}" --run "$(nr d1)" --device tpu --preset tiny --steps 2 --warmup 1
  expect2 flags eval_device_tpu 'device|tpu' -- "${EVAL[@]}" "$RUN/checkpoints/best" --device tpu
  if ((!HAVE_GPU)); then
    expect2 flags train_device_cuda_no_gpu "$NOGPU" -- "${TRAIN[@]}" --run "$(nr d2)" --device cuda --preset tiny --steps 2 --warmup 1
    expect2 flags bench_no_gpu "$NOGPU" -- "$T07" --out "$O" bench --steps 1 --warmup 0
    expect2 flags sample_device_cuda_no_gpu "$NOGPU" -- "$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" --prompt love --device cuda --max-new-tokens 4
  fi
  expect2 flags model_seed_negative 'model-seed|seed' -- "${TRAIN[@]}" --run "$(nr s1)" "${TF[@]}" --steps 2 --model-seed -1
  expect2 flags seed_negative 'seed' -- "$T07" --out "$O" --seed -1 sample --checkpoint "$RUN/checkpoints/best" --prompt love --max-new-tokens 4
  expect2 flags batch_1e9 "$SIZES|at most|more than" -- "${TRAIN[@]}" --run "$(nr b1)" --device cpu --precision fp32 --preset tiny --steps 2 --warmup 1 --batch 1000000000 --seq-len 16
  expect2 flags batch_2e31_minus_1 "$SIZES|at most|more than" -- "${TRAIN[@]}" --run "$(nr b2)" --device cpu --precision fp32 --preset tiny --steps 2 --warmup 1 --batch 2147483647 --seq-len 16
  expect2 flags batch_2e32 'batch' -- "${TRAIN[@]}" --run "$(nr b3)" --device cpu --precision fp32 --preset tiny --steps 2 --warmup 1 --batch 4294967296 --seq-len 16
  expect2 flags seq_len_1e8 'bytes|seq.len|tokens' -- "${TRAIN[@]}" --run "$(nr q1)" --device cpu --precision fp32 --preset tiny --steps 2 --warmup 1 --batch 2 --seq-len 100000000
  expect2 flags batch_seq_product "$SIZES|at most|more than" -- "${TRAIN[@]}" --run "$(nr q2)" --device cpu --precision fp32 --preset tiny --steps 2 --warmup 1 --batch 200000 --seq-len 10000
  # within the index limit (2^31 / vocab tokens a step) but far beyond any memory: the bytes needed and available
  expect2 flags batch_over_memory "$SIZES" -- "${TRAIN[@]}" --run "$(nr b4)" --device cpu --precision fp32 --preset tiny --steps 2 --warmup 1 --batch 400000 --seq-len 16
  expect_end flags eval_batch_1e9 "" -- "${EVAL[@]}" "$RUN/checkpoints/best" --batch 1000000000
  echo "a file" >"$W/c/a_file"
  expect2 flags run_under_file 'a_file|run' -- "${TRAIN[@]}" --run "$W/c/a_file/run" "${TF[@]}" --steps 2
  expect2 flags run_is_file 'a_file|run' -- "${TRAIN[@]}" --run "$W/c/a_file" "${TF[@]}" --steps 2
  expect2 flags run_in_proc '/proc' -- "${TRAIN[@]}" --run /proc/nano_dsv3_bad_inputs_run "${TF[@]}" --steps 2
  expect2 flags run_dev_null '/dev/null|run' -- "${TRAIN[@]}" --run /dev/null "${TF[@]}" --steps 2
  expect2 flags out_under_file 'a_file|out' -- "$T07" --out "$W/c/a_file/out" prepare --no-default-corpus --lyrics "$W/songs.txt" --vocab 300
  expect2 flags lr_nan '\blr\b' -- "${TRAIN[@]}" --run "$(nr l1)" "${TF[@]}" --steps 2 --lr nan
  expect2 flags lr_inf '\blr\b' -- "${TRAIN[@]}" --run "$(nr l2)" "${TF[@]}" --steps 2 --lr inf
  expect2 flags min_lr_ratio_negative 'min.lr.ratio' -- "${TRAIN[@]}" --run "$(nr l3)" "${TF[@]}" --steps 2 --min-lr-ratio -1
  expect2 flags min_lr_ratio_2 'min.lr.ratio' -- "${TRAIN[@]}" --run "$(nr l4)" "${TF[@]}" --steps 2 --min-lr-ratio 2
  expect2 flags weight_decay_nan 'weight.decay' -- "${TRAIN[@]}" --run "$(nr l5)" "${TF[@]}" --steps 2 --weight-decay nan
  expect2 flags warmup_over_steps 'warmup' -- "${TRAIN[@]}" --run "$(nr w1)" "${TF[@]}" --steps 2 --warmup 100
  expect2 flags patience_negative 'patience' -- "${TRAIN[@]}" --run "$(nr pa)" "${TF[@]}" --steps 2 --patience -1
  expect2 flags max_minutes_negative 'max.minutes' -- "${TRAIN[@]}" --run "$(nr m1)" "${TF[@]}" --steps 2 --max-minutes -1
  expect2 flags max_minutes_nan 'max.minutes' -- "${TRAIN[@]}" --run "$(nr m2)" "${TF[@]}" --steps 2 --max-minutes nan
  # several GPUs (README "Several GPUs"): named before anything starts
  expect2 flags gpus_zero 'gpus' -- "$T07" --out "$O" --gpus 0 train --data "$DATA" --run "$(nr g1)" "${TF[@]}" --steps 2
  expect2 flags gpus_env_word 'DSV3_GPUS' -- env DSV3_GPUS=two "${TRAIN[@]}" --run "$(nr g2)" "${TF[@]}" --steps 2
  expect2 flags gpus_sample 'gpus.*train, bench' -- "$T07" --out "$O" --gpus 2 sample --checkpoint "$RUN/checkpoints/best" --prompt love
  expect2 flags gpus_cpu 'gpus.*cpu' -- "$T07" --out "$O" --gpus 2 train --data "$DATA" --run "$(nr g3)" "${TF[@]}" --steps 2
  expect2 flags gpus_batch_odd 'not a multiple|GPU' -- "$T07" --out "$O" --gpus 2 train --data "$DATA" --run "$(nr g4)" --preset tiny --batch 3 --steps 2 --warmup 1
  expect2 flags rank_env_partial 'DSV3_RANK' -- env DSV3_RANK=1 "${TRAIN[@]}" --run "$(nr g5)" "${TF[@]}" --steps 2
  expect2 flags preset_unknown 'nothing_such|preset' -- "${TRAIN[@]}" --run "$(nr u1)" "${TF[@]/tiny/nothing_such}" --steps 2
  expect2 flags resume_without_run 'checkpoint|resume' -- "${TRAIN[@]}" --run "$(nr r1)" "${TF[@]}" --steps 2 --resume
  r=$(mkrun flags.fresh_into_run)
  expect2 flags fresh_train_into_run 'resume' -- "${TRAIN[@]}" --run "$r" "${TF[@]}" --steps 9
  r=$(mkrun flags.resume_other_batch)
  expect2 flags resume_other_batch 'batch' -- "${TRAIN[@]}" --run "$r" "${TF[@]/#2/3}" --steps 9 --resume
  r=$(mkrun flags.resume_other_data)
  expect2 flags resume_other_data 'other data|vocab' -- "$T07" --out "$O" train --data "$DATA2" --run "$r" "${TF[@]}" --steps 9 --resume
  expect2 flags sample_checkpoint_missing 'nothing' -- "${SAMPLE[@]}" "$W/nothing/checkpoints/best"
  expect2 flags eval_checkpoint_missing 'nothing' -- "${EVAL[@]}" "$W/nothing/checkpoints/best"
  expect2 flags eval_data_missing 'nothing' -- "$T07" --out "$O" eval --device cpu --data "$W/nothing" --checkpoint "$RUN/checkpoints/best"
  expect2 flags eval_other_vocab 'vocab' -- "$T07" --out "$O" eval --device cpu --data "$DATA2" --checkpoint "$RUN/checkpoints/best"
  S1=("$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" --prompt love)
  expect2 flags temperature_negative 'temperature' -- "${S1[@]}" --temperature -1 --max-new-tokens 4
  expect2 flags temperature_nan 'temperature' -- "${S1[@]}" --temperature nan --max-new-tokens 4
  expect2 flags top_k_negative 'top.k' -- "${S1[@]}" --top-k -5 --max-new-tokens 4
  expect2 flags top_p_zero 'top.p' -- "${S1[@]}" --top-p 0 --max-new-tokens 4
  expect2 flags top_p_over_1 'top.p' -- "${S1[@]}" --top-p 1.5 --max-new-tokens 4
  expect2 flags top_p_nan 'top.p' -- "${S1[@]}" --top-p nan --max-new-tokens 4
  expect2 flags max_new_tokens_negative 'max.new.tokens' -- "${S1[@]}" --max-new-tokens -1
  expect2 flags prompt_invalid_utf8 'UTF-8|utf8' -- "$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" --prompt $'\xff\xfe love' --max-new-tokens 4
  expect2 flags prompt_reserved_char 'U\+E000|reserved' -- "$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" --prompt $'love \xee\x80\x80' --max-new-tokens 4
  # a prompt longer than the model's positions is cropped to its last ones, with a note (never an error)
  expect0 flags prompt_nul_free_long 'cropped to its last 64' -- "$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" --prompt "$(head -c 3000 "$W/songs.txt")" --max-new-tokens 4
  # more new tokens than positions: the cache is re-filled from the last half (or the model ends the song first)
  expect0 flags max_new_tokens_past_positions '200 new tokens, [0-9]+ re-fills? of the 64-position window|^\(end of song\)$' -- "${S1[@]}" --max-new-tokens 200 --temperature 0
  expect2 flags max_new_tokens_huge 'max.new.tokens' -- "${S1[@]}" --max-new-tokens 2000000
  # sample's device and batch (issue 19): a bad device, a bad count; N samples printed with their streams
  expect2 flags sample_device_tpu 'device|tpu' -- "${S1[@]}" --device tpu --max-new-tokens 4
  expect2 flags num_samples_zero 'num.samples' -- "${S1[@]}" --num-samples 0 --max-new-tokens 4
  expect2 flags num_samples_huge 'num.samples' -- "${S1[@]}" --num-samples 100000 --max-new-tokens 4
  expect0 flags num_samples_three 'sample 2 of 3: random stream' '^3 samples' -- "${S1[@]}" --device cpu --num-samples 3 --max-new-tokens 4
  # the GPU decoder's path (the speed work of issue 19): a name it does not know
  expect2 flags gpu_decode_unknown 'gpu.decode must be v1, fused or full' -- "${S1[@]}" --gpu-decode v2 --max-new-tokens 4
  # --prompt-file and --interactive: one prompt per line, blank lines skipped; conflicting flags; bad lines
  SP=("$T07" --out "$O" sample --checkpoint "$RUN/checkpoints/best" --max-new-tokens 4)
  printf 'love\n\n  \nnight rain\r\n' >"$W/c/two_prompts.txt"
  expect0 flags prompt_file_two '^--- prompt: "love"' '^--- prompt: "night rain"' -- "${SP[@]}" --prompt-file "$W/c/two_prompts.txt"
  STDIN=$W/c/two_prompts.txt expect0 flags interactive_two '^--- prompt: "love"' '^--- prompt: "night rain"' 'end of input: 2 prompts' -- "${SP[@]}" --interactive
  STDIN=$W/c/two_prompts.txt expect0 flags interactive_speculative '^--- prompt: "night rain"' 'identical to plain decoding: yes' -- "${SP[@]}" --interactive --speculative
  expect0 flags interactive_no_input 'end of input: 0 prompts' -- "${SP[@]}" --interactive
  expect2 flags interactive_and_prompt_file 'interactive.*prompt-file' -- "${SP[@]}" --interactive --prompt-file "$W/c/two_prompts.txt"
  expect2 flags interactive_and_prompt 'interactive.*prompt' -- "${SP[@]}" --interactive --prompt love
  expect2 flags prompt_file_and_prompt 'prompt-file.*prompt' -- "${SP[@]}" --prompt-file "$W/c/two_prompts.txt" --prompt love
  expect2 flags prompt_file_missing 'prompt file.*nothing\.txt' -- "${SP[@]}" --prompt-file "$W/nothing.txt"
  expect2 flags prompt_file_directory 'prompt file.*director' -- "${SP[@]}" --prompt-file "$W/c"
  mkfifo "$W/c/prompts.fifo"
  expect2 flags prompt_file_fifo 'prompt file.*regular' -- "${SP[@]}" --prompt-file "$W/c/prompts.fifo"
  printf '\n  \n\n' >"$W/c/blank_prompts.txt"
  expect2 flags prompt_file_blank 'blank_prompts\.txt.*no prompt' -- "${SP[@]}" --prompt-file "$W/c/blank_prompts.txt"
  printf 'love\n\nrain \xff\n' >"$W/c/bad_prompts.txt"
  expect2 flags prompt_file_bad_utf8 'bad_prompts\.txt.* line 3.*UTF-8' -- "${SP[@]}" --prompt-file "$W/c/bad_prompts.txt"
  STDIN=$W/c/bad_prompts.txt expect2 flags interactive_bad_utf8 'standard input line 3.*UTF-8' -- "${SP[@]}" --interactive
  printf 'line one\nline two\x00\n' >"$W/c/nul_lyrics.txt"
  expect2 flags prepare_lyrics_nul 'NUL|binary' -- "$T07" --out "$W/c/k1" prepare --no-default-corpus --lyrics "$W/c/nul_lyrics.txt" --vocab 300
  printf 'one tiny song\nof two lines\n' >"$W/c/one_song.txt"
  expect2 flags prepare_too_few_songs 'song|vocab|split' -- "$T07" --out "$W/c/k2" prepare --no-default-corpus --lyrics "$W/c/one_song.txt" --vocab 4096
  expect_end flags prepare_vocab_too_big_for_corpus "" -- "$T07" --out "$W/c/k3" prepare --no-default-corpus --lyrics "$W/songs.txt" --vocab 60000

  # the loss explodes: the run must end cleanly (skipped steps and a stop, or a finished run), exit 0 or 2, and every
  # checkpoint it leaves must hold finite weights and moments
  for lr in 1e3 1e300; do
    r=$(nr "lr_$lr")
    expect_end flags "lr_$lr" "$r" -- "${TRAIN[@]}" --run "$r" --device cpu --precision fp32 --preset tiny --batch 2 \
      --seq-len 16 --warmup 1 --eval-every 5 --steps 20 --lr "$lr"
  done
}

# ---------------------------------------------------------------------------------------------------------------
cat_swap() {
  echo "swap: checkpoint folders left by a save interrupted at each point"
  # swap_case NAME 'ARRANGE in $C (= <run>/checkpoints)' FROM_STEP: --resume continues from the newest complete
  # checkpoint (it says it resumed at FROM_STEP, and ends at 9), or exits 2 when FROM_STEP is "none"; a fresh train
  # into the folder must tell the user to resume
  swap_case() {
    local name=$1 arrange=$2 first=$3 r C
    if selected "swap/$name.resume"; then
      r=$(mkrun "swap.$name.resume"); C=$r/checkpoints; mutate "$arrange"
      if [[ $first == none ]]; then
        expect2 swap "$name.resume" 'no .*checkpoint|incomplete|missing|not exist' -- "${RESUME[@]}" "$r"
      else
        expect0 swap "$name.resume" "resum.* at step ${first}[^0-9]" 'done: 9 steps' -- "${RESUME[@]}" "$r"
      fi
    fi
    if selected "swap/$name.fresh"; then
      r=$(mkrun "swap.$name.fresh"); C=$r/checkpoints; mutate "$arrange"
      expect2 swap "$name.fresh" 'resume' -- "${TRAIN[@]}" --run "$r" "${TF[@]}" --steps 9
    fi
  }
  swap_case only_tmp 'mv "$C/last" "$C/last.tmp"' 6
  swap_case only_tmp_no_best 'mv "$C/last" "$C/last.tmp"; rm -rf "$C/best"' 6
  swap_case old_and_tmp 'mv "$C/last" "$C/last.tmp"; cp -a "$LAST3" "$C/last.old"' 6
  swap_case last_and_old 'cp -a "$LAST3" "$C/last.old"' 6
  swap_case last_and_partial_tmp 'cp -a "$C/last" "$C/last.tmp"; rm "$C/last.tmp/optimizer.safetensors"; rm -rf "$C/last"; cp -a "$LAST3" "$C/last"' 3
  swap_case old_and_partial_tmp 'mv "$C/last" "$C/last.tmp"; rm "$C/last.tmp/trainer_state.json"; cp -a "$LAST3" "$C/last.old"' 3
  swap_case old_and_truncated_tmp 'mv "$C/last" "$C/last.tmp"; truncate -s 1000 "$C/last.tmp/model.safetensors"; cp -a "$LAST3" "$C/last.old"' 3
  swap_case only_old 'mv "$C/last" "$C/last.old"' 6
  swap_case only_partial_tmp 'mv "$C/last" "$C/last.tmp"; rm "$C/last.tmp/model.safetensors"' none
  # last damaged but best intact: a resume may refuse (exit 2 naming last) or fall back to best, saying why it
  # skipped last -- never silently
  damaged_latest() {
    local name=$1 mut=$2 pat=$3 r pre st
    selected "swap/$name.resume" || return 0
    r=$(mkrun "swap.$name.resume")
    D=$r/checkpoints/last mutate "$mut"
    suite_error swap "$name.resume" "${RESUME[@]}" "$r" && return 0
    pre=$(logname swap "$name.resume")
    run_prog "$pre" "${RESUME[@]}" "$r"
    st=$(fail_class)
    if [[ -z $st ]]; then
      st=clean
      errtext "$pre.err" | grep -Eaqi "checkpoints/last.*($pat)" || { st=wrong-code; NOTE="stderr lacks /checkpoints\/last.*($pat)/"; }
    elif [[ $st == accepted ]]; then
      cat "$pre.out" "$pre.err" | grep -Eaqi "checkpoints/last.*($pat)" && st=clean ||
        NOTE="resumed (from best?) without a warning naming the damaged last"
    fi
    record swap "$name.resume" "$st" "$pre" "exit 2 naming last, or exit 0 with a warning naming last and /$pat/" \
      "${RESUME[@]}" "$r"
  }
  damaged_latest damaged_latest_model 'st fill "$D/model.safetensors" model.layers.0.self_attn.kv_a_proj_with_mqa.weight nan' 'non-finite|\bnan\b'
  damaged_latest damaged_latest_state ': >"$D/trainer_state.json"' 'trainer_state'
  damaged_latest damaged_latest_optimizer 'st fill "$D/optimizer.safetensors" embed.exp_avg nan 1' 'exp_avg|non-finite'
  # sample and eval in the window between the renames of best
  for prog in sample eval; do
    if selected "swap/best_old_only.$prog"; then
      r=$(mkrun "swap.best_old_only.$prog")
      mv "$r/checkpoints/best" "$r/checkpoints/best.old"
      if [[ $prog == sample ]]; then
        expect0 swap "best_old_only.$prog" 'prompt' -- "${SAMPLE[@]}" "$r/checkpoints/best"
      else
        expect0 swap "best_old_only.$prog" '"val_ce"' -- "${EVAL[@]}" "$r/checkpoints/best"
      fi
    fi
  done
}

# ---------------------------------------------------------------------------------------------------------------
cat_signals() {
  echo "signals: a stopped run finishes its step, saves, exits 128+signal; --resume continues"
  signal_case() {
    local sig=$1 num=$2 name=signal_$1
    selected "signals/$name" || return 0
    local r pre st step=0 t0 i pid
    r=$(nr "$name")
    pre=$(logname signals "$name")
    local cmd=("${TRAIN[@]}" --run "$r" --device cpu --precision fp32 --preset tiny --batch 4 --seq-len 32 --warmup 1
      --eval-every 1000000 --steps 1000000)
    "${cmd[@]}" >"$pre.out" 2>"$pre.err" </dev/null &
    pid=$!
    # a few steps: wait for the 5th step line (stdout may be buffered or sparse: at most 2.5 s)
    for ((i = 0; i < 25; i++)); do
      grep -q '^step 5/' "$pre.out" 2>/dev/null && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -s "$sig" "$pid" 2>/dev/null
    t0=$SECONDS
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - t0 < TIMEOUT)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      RC=137; st=hang
    else
      wait "$pid"
      RC=$?
      if [[ -f $r/checkpoints/last/trainer_state.json ]]; then
        step=$("$PY" -S -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$r/checkpoints/last/trainer_state.json")
      fi
      if ((RC == 128 + num)) && ((step > 0)); then
        st=clean
        cat "$pre.out" "$pre.err" | grep -Eaqi 'signal|stopped' || { st=wrong-code; NOTE="no message saying the run was stopped"; }
      elif ((RC == 128 + num)); then st=crash; NOTE="no last checkpoint saved (killed by the signal, or exit without saving)"
      elif ((RC > 128)); then st=crash
      elif ((RC == 0)); then st=accepted; NOTE="exit 0: a stopped run must tell itself from a finished one (128+signal); last step $step"
      else st=wrong-code; fi
    fi
    record signals "$name" "$st" "$pre" "exit $((128 + num)) with checkpoints/last saved" "${cmd[@]}"
    if [[ $st == clean ]]; then
      expect0 signals "$name.resume" "resum.* at step ${step}[^0-9]" "done: $((step + 3)) steps" -- "${TRAIN[@]}" --run "$r" --device cpu \
        --precision fp32 --preset tiny --batch 4 --seq-len 32 --warmup 1 --eval-every 1000000 --steps $((step + 3)) --resume
    else
      selected "signals/$name.resume" && { RC=-; NOTE="not run: the stop left no checkpoint"; record signals "$name.resume" wrong-code "" "--resume continues" "(skipped)"; }
    fi
  }
  signal_case TERM 15
  signal_case HUP 1
  signal_case INT 2
}

# ---------------------------------------------------------------------------------------------------------------
# run: the categories as parallel jobs (each prints into its own log), then the signals alone (timing-sensitive)
JOBS=${BAD_INPUTS_JOBS:-$(nproc 2>/dev/null || echo 2)}
for c in "${CATEGORIES[@]}"; do
  [[ $c == signals ]] && continue
  while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
  "cat_$c" >"$W/cat.$c.txt" 2>&1 &
done
wait
cat_signals >"$W/cat.signals.txt" 2>&1
for c in "${CATEGORIES[@]}"; do cat "$W/cat.$c.txt"; done

echo
printf '%-14s %6s %6s %6s %6s %9s %11s\n' category tried clean crash hang accepted wrong-code
total=0 bad=0
for c in "${CATEGORIES[@]}"; do
  read -r n cl cr h a wr < <(awk -F'\t' -v c="$c" '$1 == c { n++; s[$3]++ }
    END { printf "%d %d %d %d %d %d\n", n, s["clean"], s["crash"], s["hang"], s["accepted"], s["wrong-code"] }' "$RESULTS")
  ((n)) || continue
  printf '%-14s %6d %6d %6d %6d %9d %11d\n' "$c" "$n" "$cl" "$cr" "$h" "$a" "$wr"
  total=$((total + n))
  bad=$((bad + n - cl))
done
echo "bad_inputs: $total cases, $((total - bad)) clean, $bad not clean, $((SECONDS - T_START)) s"
if ((bad)); then
  echo
  echo "not clean (the first lines of stderr, the last of stdout):"
  for c in "${CATEGORIES[@]}"; do [[ -f $W/fail/$c.txt ]] && cat "$W/fail/$c.txt"; done
  exit 1
fi
exit 0
