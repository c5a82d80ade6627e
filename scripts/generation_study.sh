#!/usr/bin/env bash
# Does kNN-LM decoding help open-ended generation? Continue validation prompts with `knnlm generate`
# at λ ∈ {0, 0.25} × τ ∈ {1, tuned}, then measure speed, base-LM perplexity, repetition and copying of
# training 8-grams (python -m knnlm.generation.study). Finished settings are skipped on a rerun.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/generation_study.sh [options]

Continue PROMPTS validation prompts (the first 32 words of evenly spaced paragraphs that hold at least
96 words) by 64 words each (</s> barred: fixed length) with the kNN-LM of a fairseq checkpoint, per
decoding and setting: λ = 0 (the base LM: one run whatever τ), λ = 0.25 with τ = 1, λ = 0.25 with the
tuned τ. Then measure each setting and the human continuations (the paragraphs' true next 64 words):
tokens/s of generation, the base LM's perplexity of the continuations given their prompts,
distinct-1/2/3, repeated 4-grams, and the words inside an 8-gram of the training split.

Options (defaults: the converged small WikiText-2 model of scripts/ton2022.sh, ω = 0, seed 1):
  --checkpoint FILE   fairseq checkpoint (checkpoints/ton2022-small/wikitext-2/w0-s1/checkpoint_best.pt)
  --data DIR          its data-bin (data-bin/wikitext-2)
  --run DIR           its scripts/knnlm_pipeline.sh folder (runs/ton2022-small/wikitext-2/w0-s1): the
                      datastore DIR/datastore/att, the index DIR/index/att.l2.faiss, the valid cache
                      DIR/cache/valid (for the tuned τ)
  --datastore DIR     instead of the run's
  --index FILE        instead of the run's
  --tau-json FILE     `knnlm analyze temperature` output: τ = models[0].tuned.tau
  --decodings "D ..." sample (top-p, seeded) and/or greedy (default: "sample greedy")
  --out DIR           study folder (results/generation_study)
  -h, --help          this text

The tuned τ is, first found: $TAU_TUNED, --tau-json, OUT/temperature/temperature.json, or computed
into the latter by `knnlm analyze temperature` on the run's valid cache (λ tuned at each τ).
Environment: TAU_TUNED, PROMPTS (200), LAMBDA (0.25), K (1024), NPROBE (default: the index's),
TOP_P (0.9), SEED (1), BATCH_SIZE (20), DEVICE (auto). Run it as
`OMP_NUM_THREADS=1 nice -n 5 scripts/generation_study.sh` beside other jobs on a small machine.

Outputs in OUT: prompts.txt, references.jsonl, generations/<decoding>.<setting>.jsonl (knnlm generate
--out), results.jsonl and table.md.
EOF
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

CKPT='' DATA='' RUN='' DATASTORE='' INDEX='' TAU_JSON='' OUT_DIR='' DECODINGS='sample greedy'
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --checkpoint) need_value "$1" $#; CKPT=$(abspath "$2"); shift 2 ;;
    --data) need_value "$1" $#; DATA=$(abspath "$2"); shift 2 ;;
    --run) need_value "$1" $#; RUN=$(abspath "$2"); shift 2 ;;
    --datastore) need_value "$1" $#; DATASTORE=$(abspath "$2"); shift 2 ;;
    --index) need_value "$1" $#; INDEX=$(abspath "$2"); shift 2 ;;
    --tau-json) need_value "$1" $#; TAU_JSON=$(abspath "$2"); shift 2 ;;
    --decodings) need_value "$1" $#; DECODINGS=$2; shift 2 ;;
    --out) need_value "$1" $#; OUT_DIR=$(abspath "$2"); shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
for decoding in $DECODINGS; do
  case $decoding in sample | greedy) ;; *) usage_error "a decoding is sample or greedy, not '$decoding'" ;; esac
done
require_commands knnlm
cd "$(dirname "$0")/.."
CKPT=${CKPT:-checkpoints/ton2022-small/wikitext-2/w0-s1/checkpoint_best.pt}
DATA=${DATA:-data-bin/wikitext-2}
RUN=${RUN:-runs/ton2022-small/wikitext-2/w0-s1}
DATASTORE=${DATASTORE:-$RUN/datastore/att}
INDEX=${INDEX:-$RUN/index/att.l2.faiss}
OUT_DIR=${OUT_DIR:-results/generation_study}
PROMPTS=${PROMPTS:-200} LAMBDA=${LAMBDA:-0.25} K=${K:-1024} TOP_P=${TOP_P:-0.9} SEED=${SEED:-1}
BATCH_SIZE=${BATCH_SIZE:-20} DEVICE=${DEVICE:-auto}
PROMPT_LEN=32 NEW_TOKENS=64  # words of each prompt and of each continuation
[ -f "$CKPT" ] || die "no checkpoint $CKPT (--checkpoint)"
[ -f "$DATA/dict.txt" ] || die "no data-bin $DATA (--data)"
[ -f "$DATASTORE/meta.json" ] || die "no datastore $DATASTORE (--datastore, or --run)"
[ -f "$INDEX.meta.json" ] || die "no finished index $INDEX (no $INDEX.meta.json yet; --index, or --run)"

shown() { printf '$'; printf ' %q' "$@"; printf '\n'; }  # the command as run, for COMMANDS.md
run() { shown "$@"; "$@"; }

mkdir -p "$OUT_DIR/generations"
if [ ! -f "$OUT_DIR/references.jsonl" ]; then
  step "prompts -> $OUT_DIR/prompts.txt"
  run python -m knnlm.generation.study prompts --data "$DATA" --out "$OUT_DIR" --prompts "$PROMPTS" \
    --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS"
fi

tuned_tau() {  # the tuned τ, from the first source that has it
  local json=$TAU_JSON
  if [ -n "${TAU_TUNED:-}" ]; then echo "$TAU_TUNED"; return; fi
  if [ -z "$json" ]; then
    json=$OUT_DIR/temperature/temperature.json
    if [ ! -f "$json" ]; then
      [ -f "$RUN/cache/valid/meta.json" ] || die "no TAU_TUNED, --tau-json or valid cache $RUN/cache/valid to tune τ on"
      step "tune τ on $RUN/cache/valid -> $OUT_DIR/temperature" >&2
      run knnlm analyze temperature --cache "$RUN/cache/valid" --out "$OUT_DIR/temperature" >&2
    fi
  fi
  local tau
  tau=$(json_field "$json" models 0 tuned tau)
  [ -n "$tau" ] || die "$json has no models[0].tuned.tau (write it with \`knnlm analyze temperature\`, or set TAU_TUNED)"
  printf '%.4g\n' "$tau"
}
TAU=$(tuned_tau)
echo "tuned τ = $TAU"

GENERATIONS=()
for decoding in $DECODINGS; do
  if [ "$decoding" = sample ]; then SEARCH=(--sampling --sampling-topp "$TOP_P" --seed "$SEED"); else SEARCH=(); fi
  for setting in "0 1" "$LAMBDA 1" "$LAMBDA $TAU"; do
    read -r lam tau <<< "$setting"
    name=$decoding.lambda$lam
    [ "$lam" = 0 ] || name+=.tau$tau
    file=$OUT_DIR/generations/$name.jsonl
    GENERATIONS+=("$file")
    if [ -f "$file" ] && [ "$(wc -l < "$file")" -eq "$(wc -l < "$OUT_DIR/prompts.txt")" ]; then
      echo "reusing $file"
      continue
    fi
    step "generate $name -> $file"
    rm -f "$file.part"
    run knnlm generate --checkpoint "$CKPT" --data "$DATA" --datastore "$DATASTORE" --index "$INDEX" \
      --prompt-file "$OUT_DIR/prompts.txt" --lmbda "$lam" --knn-temp "$tau" --k "$K" ${NPROBE:+--nprobe "$NPROBE"} \
      "${SEARCH[@]}" --max-new-tokens "$NEW_TOKENS" --min-new-tokens "$NEW_TOKENS" --batch-size "$BATCH_SIZE" \
      --device "$DEVICE" --out "$file.part"
    mv "$file.part" "$file"
  done
done

step "measure -> $OUT_DIR/table.md"
run python -m knnlm.generation.study summarize --checkpoint "$CKPT" --data "$DATA" --out "$OUT_DIR" "${GENERATIONS[@]}"
