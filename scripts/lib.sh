# shellcheck shell=bash
# Shared by scripts/ton2022.sh and scripts/xu2023.sh (sourced, never run): preparing a corpus,
# the training recipes, training one LM with the activation-L2 criterion (ω = 0 is plain
# cross-entropy), reading its final training perplexity, and running the evaluation pipeline.
# Sourcing defines functions and nothing else; paths are relative to the repository root.

usage_error() {  # message: a bad command line (exit 2, like argparse)
  echo "$(basename "$0"): $*" >&2
  echo "Try '$0 --help'." >&2
  exit 2
}

die() {  # message: a failure while running
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

step() { printf '\n== %s\n' "$*"; }

require_commands() {  # command...: each must be on PATH, else one error that says how to get it there
  local name
  for name in "$@"; do
    command -v "$name" > /dev/null \
      || die "$name: command not found; install the framework with 'make install', then put its environment on PATH ('source .venv/bin/activate')"
  done
}

abspath() {  # path: absolute, so that it survives the scripts' cd to the repository root
  case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac
}

json_field() {  # file key...: the value at that key path of a JSON file (empty when absent or null)
  python - "$@" <<'PY'
import json
import sys

value = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:  # a list is indexed by a number: `json_field f models 0 tuned tau`
    if isinstance(value, list) and key.isdigit() and int(key) < len(value):
        value = value[int(key)]
    else:
        value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)
PY
}

dump_limit() {  # cache: the --limit-tokens it was dumped with (empty: the whole split)
  json_field "$1/meta.json" dump limit_tokens
}

need_value() {  # option remaining-arg-count: the option must be followed by a value
  [ "$2" -ge 2 ] || usage_error "$1 needs a value"
}

ensure_data() {  # folder corpus [knnlm prepare options...]: prepare data-bin/<name> unless it is complete
  local folder=$1 corpus=$2
  shift 2
  [ -f "$folder/meta.json" ] && return 0
  step "prepare $corpus -> $folder"
  knnlm prepare "$corpus" --dest "$(dirname "$folder")" "$@"
  [ -f "$folder/meta.json" ] || die "knnlm prepare did not produce $folder (check the --bpe/--vocab-size options)"
}

gpu_count() {  # GPUS if set, else the GPUs nvidia-smi lists (0 without a driver)
  if [ -n "${GPUS:-}" ]; then echo "$GPUS"; return; fi
  nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
}

baevski_auli_args() {  # arch max-update warmup per-gpu-batches: Baevski & Auli (2019)'s recipe, as in Khandelwal et al.
  local arch=$1 max_update=$2 warmup=$3 batches=$4 gpus
  gpus=$(gpu_count)
  [ "$gpus" -ge 1 ] || die "the paper scale trains on GPUs and none was found (set GPUS=N to override)"
  # update_freq keeps the paper's tokens per update whatever the number of GPUs (rounded up)
  TRAIN_ARGS=(--arch "$arch" --tokens-per-sample 3072 --max-tokens 3072
    --update-freq $(((batches + gpus - 1) / gpus))
    --optimizer nag --lr 1.0 --min-lr 0.0001 --stop-min-lr 1e-09 --clip-norm 0.1
    --lr-scheduler cosine --t-mult 2 --lr-shrink 0.75 --lr-period-updates $((max_update - warmup))
    --warmup-updates "$warmup" --warmup-init-lr 1e-07 --max-update "$max_update"
    --skip-invalid-size-inputs-valid-test --fp16)
}

set_train_args() {  # recipe: fills TRAIN_ARGS for small | wiki2 | wiki103
  case $1 in
    small)  # CPU-sized; trained one epoch at a time until the validation perplexity plateaus
            # (see plateaued: MIN_GAIN, PATIENCE, MIN_EPOCHS), at most EPOCHS (default 60) passes over WikiText-2;
            # TRAIN_DEVICE=cuda trains the same recipe on the GPU (scripts/gpu_reproduce.sh)
      TRAIN_ARGS=(--arch knnlm_transformer_lm_small --tokens-per-sample 256 --max-tokens 4096
        --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.1 --lr 0.001
        --lr-scheduler inverse_sqrt --warmup-updates 500 --warmup-init-lr 1e-07)
      [ "${TRAIN_DEVICE:-cpu}" != cpu ] || TRAIN_ARGS+=(--cpu)
      TRAIN_ARGS+=(--num-workers 0) ;;
    wiki103)  # 286K updates of 8 GPUs x 3 x 3072 tokens (Baevski & Auli 2019; Khandelwal et al. 2020)
      baevski_auli_args knnlm_transformer_lm_wiki103 286000 16000 24 ;;
    wiki2)  # not given by Ton et al.: the same recipe, shortened to WikiText-2's size (3 x 3072 tokens
            # per update, ~230 updates an epoch); checkpoint_best.pt (validation loss) guards against overfitting
      baevski_auli_args knnlm_transformer_lm_wiki2 "${WIKI2_MAX_UPDATE:-20000}" "${WIKI2_WARMUP:-2000}" 3 ;;
    *) die "unknown training recipe '$1'" ;;
  esac
}

model_name() {  # criterion omega seed: the model's name in scripts/ton2022.sh's set (its checkpoint and result folders)
  if [ "$1" = activation_l2 ]; then echo "w$2-s$3"; else echo "moco-w$2-s$3"; fi
}

train_lm() {  # recipe data save-dir omega seed criterion [fairseq-train options...]: train once, then reuse
  # small recipe: TRAIN_DEADLINE (a `date +%s` time) caps its wall time; how it stopped goes to train.stop
  local recipe=$1 data=$2 dir=$3 omega=$4 seed=$5 criterion=$6 epoch stop='' t0 last=0 rc limit left
  shift 6
  if [ -f "$dir/train.done" ] && [ -f "$dir/checkpoint_best.pt" ]; then
    # a small-recipe model finished under another stopping rule is trained on until this one stops it
    # (one without a training log, a checkpoint brought from elsewhere, is taken as it is)
    if [ "$recipe" != small ] || [ ! -s "$dir/train.log" ] || [ -n "$(stop_reason "$dir/train.log")" ]; then
      echo "reusing $dir/checkpoint_best.pt (delete $dir/train.done to train again)"
      return 0
    fi
    # shellcheck disable=SC2046  # the rule is four words without spaces
    printf '%s was finished under another stopping rule: training on until MIN_GAIN=%s PATIENCE=%s MIN_EPOCHS=%s EPOCHS=%s stops it\n' \
      "$dir" $(stopping_rule)
    rm -f "$dir/train.done"
  fi
  require_commands fairseq-train
  set_train_args "$recipe"
  mkdir -p "$dir"
  step "train $recipe, $criterion ω=$omega, seed $seed -> $dir (log: $dir/train.log)"
  local train=(fairseq-train "$data" --user-dir "$PWD/knnlm" --task language_modeling --sample-break-mode none
    --criterion "$criterion" --activation-weight "$omega" --knn-key att --ddp-backend legacy_ddp
    --seed "$seed" --save-dir "$dir" --no-epoch-checkpoints --log-format simple --log-interval 100
    "${TRAIN_ARGS[@]}" "$@")
  # an interrupted run resumes from checkpoint_last.pt (fairseq's own restart); the log is appended to
  if [ "$recipe" = small ]; then
    # one epoch per call, so that the stopping rule sees every sitting's epochs (fairseq's own
    # --patience counter starts again at each restart)
    while stop=$(stop_reason "$dir/train.log"); [ -z "$stop" ]; do
      epoch=$(valid_ppls "$dir/train.log" | tail -n 1 | cut -d ' ' -f 1)
      # with a deadline, an epoch starts only if the one before it would still fit, and is cut at it
      limit=()
      if [ -n "${TRAIN_DEADLINE:-}" ]; then
        left=$((TRAIN_DEADLINE - $(date +%s)))
        [ "$left" -gt "$last" ] || { stop='time'; break; }
        limit=(timeout --kill-after=10 "$left")
      fi
      t0=$(date +%s) rc=0
      "${limit[@]}" "${train[@]}" --max-epoch $((${epoch:-0} + 1)) >> "$dir/train.log" 2>&1 || rc=$?
      case $rc in
        0) ;;
        124 | 137) stop='time'; echo "epoch $((${epoch:-0} + 1)): cut at TRAIN_DEADLINE"; break ;;
        *) tail -n 20 "$dir/train.log" >&2; die "fairseq-train failed; see $dir/train.log" ;;
      esac
      last=$(($(date +%s) - t0))
      valid_ppls "$dir/train.log" | tail -n 1 | awk '{print "epoch " $1 ": valid ppl " $2}'
    done
    echo "$stop" > "$dir/train.stop"
  else
    "${train[@]}" >> "$dir/train.log" 2>&1 \
      || { tail -n 20 "$dir/train.log" >&2; die "fairseq-train failed; see $dir/train.log"; }
  fi
  [ -f "$dir/checkpoint_best.pt" ] || die "no $dir/checkpoint_best.pt after training (validation disabled?)"
  grep -F -e '| train |' -e '| valid |' "$dir/train.log" | tail -n 2 || true
  # stopped by the deadline: usable, but a later call goes on training it
  [ "$stop" = time ] || touch "$dir/train.done"
}

stopping_rule() {  # the small recipe's stopping rule, its defaults filled in: "MIN_GAIN PATIENCE MIN_EPOCHS EPOCHS"
  echo "${MIN_GAIN:-0.01} ${PATIENCE:-3} ${MIN_EPOCHS:-3} ${EPOCHS:-60}"
}

stop_reason() {  # fairseq-log: "plateau" or "epochs" once the small recipe's stopping rule ends training, else nothing
  local gain patience min_epochs epochs epoch
  read -r gain patience min_epochs epochs <<< "$(stopping_rule)"
  if plateaued "$1" "$gain" "$patience" "$min_epochs"; then
    echo plateau
    return 0
  fi
  epoch=$(valid_ppls "$1" | tail -n 1 | cut -d ' ' -f 1)
  if [ "${epoch:-0}" -ge "$epochs" ]; then echo epochs; fi
}

valid_ppls() {  # fairseq-log: "EPOCH PPL" for each validated epoch (its last report), in epoch order
  [ -f "$1" ] || return 0
  { grep -F '| valid |' "$1" || true; } \
    | sed -n 's/.*| epoch \([0-9]*\) .*| ppl \([0-9.]*\) .*/\1 \2/p' \
    | awk '{ppl[$1 + 0] = $2} END {for (e in ppl) print e, ppl[e]}' | sort -n
}

plateaued() {  # fairseq-log min-gain patience [min-epochs]: true once PATIENCE epochs in a row have each
  # failed to lower the best validation perplexity so far by the fraction MIN_GAIN (0 and 3: fairseq's
  # --patience 3), and never before MIN_EPOCHS validated epochs (default 1): a large activation-L2 weight
  # collapses the keys in its first epochs, during which the validation loss may rise before it falls
  valid_ppls "$1" | awk -v gain="$2" -v patience="$3" -v min_epochs="${4:-1}" '
    NR == 1 {best = $2; next}
    {strikes = ($2 < best * (1 - gain)) ? 0 : strikes + 1; if ($2 < best) best = $2}
    END {exit !(NR > 1 && NR >= min_epochs && strikes >= patience)}'
}

train_seconds() {  # save-dir: seconds of training over all sittings, the sum of fairseq's per-epoch train_wall
  [ -f "$1/train.log" ] || return 0
  { grep -F '| train |' "$1/train.log" || true; } | sed -n 's/.*| train_wall \([0-9.]*\) .*/\1/p' \
    | awk '{s += $1} END {if (NR) print s}'
}

best_valid() {  # fairseq-log: "EPOCH PPL" of the epoch checkpoint_best.pt holds, or nothing: the lowest
  # logged validation loss, the last of equal ones (fairseq replaces it at a loss <= the best so far)
  [ -f "$1" ] || return 0
  { grep -F '| valid |' "$1" || true; } \
    | sed -n 's/.*epoch \([0-9]*\) .*| loss \([0-9.]*\) .*| ppl \([0-9.]*\) .*/\2 \1 \3/p' \
    | sort -k1,1g -k2,2nr | head -n 1 | awk '{print $2 + 0, $3}'
}

train_ppl() {  # fairseq-log: ppl of the last end-of-epoch "| train |" line (2^loss with loss in bits), or nothing
  [ -f "$1" ] || return 0
  grep -F '| train |' "$1" | tail -n 1 | sed -n 's/.*| ppl \([0-9][0-9.e+]*\).*/\1/p'
}

default_temperatures() {  # the τ grid of Figure 5 and of the datastore-size curves: the paper's 0.1-3 range,
  # then on to 100 (keys with ‖r‖² in the hundreds, like an unregularized small model's, are best at τ in the tens)
  echo 0.1:3.0:0.1,4,5,7,10,15,20,30,50,100
}

scored_with_other_checkpoint() {  # result-lines checkpoint: print the first 12 hex digits of the checkpoint
  # sha256 the file's first line was scored with, and succeed, if that is not this checkpoint's (a model
  # trained on since); fail when the file is absent or its lines do not name a checkpoint
  local was now
  [ -s "$1" ] || return 1
  was=$(python -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline()).get("knobs", {}).get("checkpoint") or "")' \
    "$1")
  [ -n "$was" ] || return 1
  now=$(sha256sum "$2" | cut -d ' ' -f 1)
  [ "$was" != "$now" ] || return 1
  echo "${was:0:12}"
}

run_pipeline() {  # checkpoint data out [VAR=VALUE...]: scripts/knnlm_pipeline.sh with these settings
  local ckpt=$1 data=$2 out=$3
  shift 3
  step "evaluate $ckpt -> $out"
  env "$@" CKPT="$ckpt" DATA="$data" OUT="$out" bash scripts/knnlm_pipeline.sh
}

temperature_model_args() {  # run-dir checkpoint-dir omega: append one model's `knnlm analyze temperature`
  # options (its valid/test caches, att datastore and best checkpoint) to TEMPERATURE_ARGS
  TEMPERATURE_ARGS+=(--cache "$1/cache/valid" --test-cache "$1/cache/test" --datastore "$1/datastore/att"
    --checkpoint "$2/checkpoint_best.pt" --label "ω=$3")
}

shared_lm_args() {  # run-dir: append the LM that every model's retrieval is also mixed with (the ω = 0
  # model's), so that the LMs' differences drop out of the comparison, to TEMPERATURE_ARGS
  TEMPERATURE_ARGS+=(--shared-lm-cache "$1/cache/valid" --shared-lm-test-cache "$1/cache/test")
}

find_device_wheels() {  # wheels-dir: WHEEL_FILES = the wheel of each pin of scripts/device_wheels.txt (names
  # spelled as wheels spell them: - and . become _); MISSING_WHEELS=1 if one is not there
  local pin name version match
  WHEEL_FILES=() MISSING_WHEELS=0
  while read -r pin; do
    case $pin in '' | '#'*) continue ;; esac
    name=${pin%%==*} version=${pin#*==}
    match=$(compgen -G "$1/${name//[-.]/_}-$version-*.whl" | head -n 1 || true)
    if [ -n "$match" ]; then
      echo "wheel  $pin: $match"
      WHEEL_FILES+=("$match")
    else
      echo "wheel  $pin: MISSING from $1/ (scripts/fetch_device_wheels.sh fetches it where there is network)"
      MISSING_WHEELS=1
    fi
  done < scripts/device_wheels.txt
}
