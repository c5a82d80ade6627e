#!/usr/bin/env bash
# The kNN-LM evaluation pipeline for one trained checkpoint:
#   datastore of the train split (att, ffn) -> FAISS indexes -> per-token caches of valid/test
#   -> retrievals (FAISS, FAISS + real score, exact) -> knnlm score -> knnlm report
# SEARCH=exact leaves out the indexes: every retrieval is an exact search (torch top-k; on the GPU with
# DEVICE=cuda), scored with mask and score "real".
# Configured by environment variables; the defaults are the CPU small scale on WikiText-2.
# The base model is CKPT (a fairseq checkpoint, DATA its data-bin) or HF_MODEL (a Hugging Face causal LM,
# DATA a folder of raw text splits).
# Every step skips work that is already complete, so an interrupted run can simply be restarted.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
: "${DATA:?set DATA=data-bin/NAME}" "${OUT:?set OUT=runs/NAME}"
require_commands knnlm
if [ -n "${HF_MODEL:-}" ]; then
  BASE_MODEL=(--hf-model "$HF_MODEL")
else
  BASE_MODEL=(--checkpoint "${CKPT:?set CKPT=path/to/checkpoint.pt or HF_MODEL=NAME_OR_PATH}")
fi
KEY_TYPES=${KEY_TYPES:-att,ffn}        # datastores to build
METRICS=${METRICS:-l2,ip}              # one FAISS index per key type and metric
TPS=${TPS:-256}                        # tokens per sample (WIKI-103 paper scale: 3072)
CW=${CW:-128}                          # context window     (WIKI-103 paper scale: 1536)
MAX_TOKENS=${MAX_TOKENS:-8192}
FACTORY=${FACTORY:-IVF1024,PQ32}       # WIKI-103 paper scale: IVF4096,PQ64
TRAIN_SIZE=${TRAIN_SIZE:-200000}       # keys sampled to train each index
NPROBE=${NPROBE:-32}
K_MAX=${K_MAX:-1024}
EVAL_LIMIT=${EVAL_LIMIT:-}             # only the first N tokens of valid/test (empty: all)
EXACT_LIMIT=${EXACT_LIMIT:-0}          # tokens of valid/test with exact neighbours ("real mask"); 0: none
EXACT_KEY=${EXACT_KEY:-att}            # key type and metric of the FAISS/real mask/score comparison
EXACT_METRIC=${EXACT_METRIC:-l2}
SCORE_ARGS=${SCORE_ARGS:-}             # extra knnlm score arguments (e.g. --label omega=1)
TEMPERATURES=${TEMPERATURES:-$(default_temperatures)}   # Figure 5's τ sweep (scripts/lib.sh); none: no sweep
DEVICE=${DEVICE:-auto}
SEARCH=${SEARCH:-faiss}                # faiss: FAISS indexes; exact: exact neighbours only, no index
case $SEARCH in
  faiss) SOURCES='' ;;
  exact)
    SOURCES='--mask-source real --score-source real'
    if [ "$EXACT_LIMIT" != 0 ]; then
      echo "knnlm_pipeline.sh: EXACT_LIMIT compares FAISS with exact neighbours; SEARCH=exact has no FAISS" >&2
      exit 2
    fi ;;
  *) echo "knnlm_pipeline.sh: SEARCH must be faiss or exact, not '$SEARCH'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
TIMINGS=$OUT/timings.tsv
[ -f "$TIMINGS" ] || printf 'step\tseconds\n' > "$TIMINGS"
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$TIMINGS"; }
limit_flag() { [ -n "$1" ] && [ "$1" != 0 ] && echo "--limit-tokens $1" || true; }

timed datastore knnlm datastore build "${BASE_MODEL[@]}" --data "$DATA" --out "$OUT/datastore" \
  --split train --key-types "$KEY_TYPES" --tokens-per-sample "$TPS" --context-window "$CW" \
  --max-tokens "$MAX_TOKENS" --device "$DEVICE"

for kt in ${KEY_TYPES//,/ }; do
  for m in ${METRICS//,/ }; do
    [ "$SEARCH" = faiss ] || continue
    idx=$OUT/index/$kt.$m.faiss
    mkdir -p "$OUT/index"
    [ -f "$idx.meta.json" ] || timed "index $kt.$m" knnlm index build --datastore "$OUT/datastore/$kt" \
      --out "$idx" --factory "$FACTORY" --metric "$m" --train-size "$TRAIN_SIZE" --nprobe "$NPROBE" --device "$DEVICE"
  done
done

dump_and_retrieve() {  # cache_root limit with_exact
  local root=$1 limit=$2 exact=$3
  for split in valid test; do
    # shellcheck disable=SC2046
    timed "dump $root/$split" knnlm eval dump "${BASE_MODEL[@]}" --data "$DATA" --split "$split" \
      --out "$root/$split" --tokens-per-sample "$TPS" --context-window "$CW" --max-tokens "$MAX_TOKENS" \
      --device "$DEVICE" $(limit_flag "$limit")
    for kt in ${KEY_TYPES//,/ }; do
      for m in ${METRICS//,/ }; do
        if [ "$SEARCH" = exact ]; then
          [ -f "$root/$split/knn/$kt-$m-real/meta.json" ] || timed "retrieve $root/$split $kt-$m exact" \
            knnlm eval retrieve --cache "$root/$split" --datastore "$OUT/datastore/$kt" \
            --similarity "$m" --k-max "$K_MAX" --device "$DEVICE"
        elif [ "$exact" = 0 ] || { [ "$kt" = "$EXACT_KEY" ] && [ "$m" = "$EXACT_METRIC" ]; }; then
          [ -f "$root/$split/knn/$kt-$m-faiss/meta.json" ] || timed "retrieve $root/$split $kt-$m-faiss" \
            knnlm eval retrieve --cache "$root/$split" --datastore "$OUT/datastore/$kt" \
            --index "$OUT/index/$kt.$m.faiss" --k-max "$K_MAX" --device "$DEVICE"
        fi
      done
    done
    if [ "$exact" = 1 ]; then
      local name=$EXACT_KEY-$EXACT_METRIC
      [ -f "$root/$split/knn/$name-faiss-realscore/meta.json" ] || timed "retrieve $root/$split $name real score" \
        knnlm eval retrieve --cache "$root/$split" --datastore "$OUT/datastore/$EXACT_KEY" \
        --index "$OUT/index/$EXACT_KEY.$EXACT_METRIC.faiss" --real-score --k-max "$K_MAX" --device "$DEVICE"
      [ -f "$root/$split/knn/$name-real/meta.json" ] || timed "retrieve $root/$split $name exact" \
        knnlm eval retrieve --cache "$root/$split" --datastore "$OUT/datastore/$EXACT_KEY" \
        --similarity "$EXACT_METRIC" --k-max "$K_MAX" --device "$DEVICE"
    fi
  done
}

dump_and_retrieve "$OUT/cache" "$EVAL_LIMIT" 0
if [ "$EXACT_LIMIT" != 0 ]; then dump_and_retrieve "$OUT/cache-exact" "$EXACT_LIMIT" 1; fi

RESULTS=$OUT/results.jsonl
rm -f "$RESULTS"
# shellcheck disable=SC2086
{
  # Table 1: key type x similarity (FAISS mask and score, k=K_MAX, tau=1, lambda tuned on valid)
  knnlm score --valid-cache "$OUT/cache/valid" --test-cache "$OUT/cache/test" --out "$RESULTS" \
    --key-type "$KEY_TYPES" --similarity "$METRICS" --k "$K_MAX" $SOURCES --skip-missing --label cache=full \
    $SCORE_ARGS
  # the fixed lambda of Ton et al. (0.3) and of Khandelwal et al. (0.25), and the valid split itself
  knnlm score --valid-cache "$OUT/cache/valid" --test-cache "$OUT/cache/test" --out "$RESULTS" \
    --key-type "$KEY_TYPES" --similarity "$METRICS" --k "$K_MAX" --lambda tune,0.25,0.3 --split valid \
    $SOURCES --skip-missing --label cache=full $SCORE_ARGS
  # Figure 5: temperature
  if [ "$TEMPERATURES" != none ]; then
    knnlm score --valid-cache "$OUT/cache/valid" --test-cache "$OUT/cache/test" --out "$RESULTS" \
      --key-type "$KEY_TYPES" --similarity "$METRICS" --k "$K_MAX" --temperature "$TEMPERATURES" $SOURCES \
      --skip-missing --label cache=full $SCORE_ARGS
  fi
  if [ "$EXACT_LIMIT" != 0 ]; then
    # Table 3, Figures 2/4 and 5 on the tokens that also have exact neighbours
    knnlm score --valid-cache "$OUT/cache-exact/valid" --test-cache "$OUT/cache-exact/test" --out "$RESULTS" \
      --key-type "$EXACT_KEY" --similarity "$EXACT_METRIC" --k "$K_MAX" --mask-source faiss,real \
      --score-source faiss,real --temperature "$TEMPERATURES" --skip-missing --label cache=exact $SCORE_ARGS
    knnlm score --valid-cache "$OUT/cache-exact/valid" --test-cache "$OUT/cache-exact/test" --out "$RESULTS" \
      --key-type "$EXACT_KEY" --similarity "$EXACT_METRIC" --k "$K_MAX" --mask-source faiss,real \
      --score-source faiss,real --subsample-ratio 0.05,0.1,0.2,0.5,1 --skip-missing --label cache=exact $SCORE_ARGS
  fi
} 2>&1 | grep -v "^INFO\|faiss.loader" || true
# the full caches (Table 1, Figure 5) and the exact-neighbour caches (Table 3, Figures 2/4, 5) are
# different token sets: one report each
# shellcheck disable=SC2046  # exact search: the tables' mask and score are "real" (their default: "faiss")
knnlm report "$RESULTS" --out "$OUT/report" --where labels.cache=full \
  $([ "$SEARCH" = faiss ] || echo --where mask_source=real --where score_source=real) > /dev/null
if [ "$EXACT_LIMIT" != 0 ]; then
  knnlm report "$RESULTS" --out "$OUT/report-exact" --where labels.cache=exact > /dev/null
fi
du -sh "$OUT"/datastore/* "$OUT"/index/* 2>/dev/null > "$OUT/sizes.txt" || true
echo "results: $RESULTS, reports: $OUT/report*, timings: $TIMINGS, sizes: $OUT/sizes.txt"
