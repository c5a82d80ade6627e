#!/usr/bin/env bash
# Xu, Alon & Neubig (2023), "Why do Nearest Neighbor Language Models Work?": the tables and figures
# of `knnlm report` (xu2023_*) from one LM: att/ffn keys x L2/IP, FAISS vs exact neighbours and
# scores, temperature and datastore-fraction sweeps (scripts/knnlm_pipeline.sh does the work), and
# datastores rebuilt from fractions of the training tokens (Figures 2/4).
# Completed trainings and pipeline steps are reused, so an interrupted run can simply be restarted.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/xu2023.sh --scale small|paper [options]

Evaluate one LM the ways Xu et al. (2023) do and render the xu2023_* tables and figures.

Scales:
  small   CPU: WikiText-2 (word level) and the ω=0, seed-1 model of `scripts/ton2022.sh --scale small`
          (trained here exactly as there if absent, reused if present); att,ffn x l2,ip; the first
          EVAL_LIMIT (default: all) tokens of valid/test, exact neighbours for the first
          EXACT_LIMIT (default 20000). What `scripts/ton2022.sh --scale small` finished for that
          model (runs/ton2022-small/wikitext-2/w0-s1: the att datastore, the att.l2 index, the
          valid/test caches with their att-l2-faiss neighbours) is linked into runs/xu2023-small,
          not rebuilt (caches only if they hold the same EVAL_LIMIT tokens).
  paper   GPU: WikiText-103 with sentencepiece BPE (Xu et al. use BPE; 32K vocabulary, adaptive
          cutoff 20000) and knnlm_transformer_lm_wiki103 trained with Baevski & Auli's recipe, or
          any trained model given with --checkpoint/--data (e.g. the released kNN-LM WikiText-103
          checkpoint with its word-level data-bin); IVF4096,PQ64 indexes; EXACT_LIMIT default 0
          (exact search over ~100M keys wants a GPU: set EXACT_LIMIT=N to add it).

Options:
  --scale small|paper   required
  --checkpoint CKPT     paper scale: evaluate this checkpoint instead of training (needs --data)
  --data DIR            the data-bin of --checkpoint
  --from DIR|ZIP        offline WikiText copy for `knnlm prepare`
  --out DIR             report folder (default results/xu2023-<scale>)
  -h, --help            this text

Figures 2/4, datastore size: besides the pipeline's score-time approximation (a seeded subset of
the cached neighbours), the att datastore is rebuilt from each of SUBSAMPLE_RATIOS (default
"0.1 0.25 0.5") of the training tokens (`knnlm datastore build --subsample`), indexed with the
FAISS factory's IVF lists scaled by the ratio (IVF2048 -> IVF256, IVF512, IVF1024 at small
scale), and searched for the valid/test tokens (FAISS; exact as well for the EXACT_LIMIT tokens)
through caches linked to the pipeline's (`knnlm eval link`: no second LM pass). Their score lines
say subsample_method=datastore_rebuild; SUBSAMPLE_RATIOS=none leaves this out, and
SUBSAMPLE_CACHES=cache-exact (default "cache cache-exact") searches them for the EXACT_LIMIT tokens
only (the full valid/test splits cost ~5.7 GB of neighbours per ratio at k = 1024).

Outputs: runs/xu2023-<scale>/ (pipeline: datastores, indexes, caches, results.jsonl;
subsample/<ratio>/ and subsample/results.jsonl: the rebuilt datastores) and <out>/report.md with
the xu2023_* parts, rendered from <out>/results.jsonl (both sets of result lines), beside the
pipeline's timings.tsv and sizes.txt; <out>/exact/: the same for the exact-neighbour tokens;
<out>/tuned-tau/ and <out>/exact/tuned-tau/: Tables 1/3 and Figures 2/4 again at the τ where att/L2
is best on valid (the rebuilt datastores are scored over the pipeline's TEMPERATURES grid too).
Environment: EPOCHS, EVAL_LIMIT, EXACT_LIMIT, SUBSAMPLE_RATIOS, SUBSAMPLE_CACHES, TEMPERATURES,
GPUS, and the variables of scripts/knnlm_pipeline.sh.
EOF
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

SCALE='' CHECKPOINT='' DATA='' FROM='' OUT_DIR=''
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --scale) need_value "$1" $#; SCALE=$2; shift 2 ;;
    --checkpoint) need_value "$1" $#; CHECKPOINT=$(abspath "$2"); shift 2 ;;
    --data) need_value "$1" $#; DATA=$(abspath "$2"); shift 2 ;;
    --from) need_value "$1" $#; FROM=$(abspath "$2"); shift 2 ;;
    --out) need_value "$1" $#; OUT_DIR=$(abspath "$2"); shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
case $SCALE in
  small) [ -z "$CHECKPOINT$DATA" ] || usage_error "--checkpoint/--data are for --scale paper" ;;
  paper)
    if [ -n "$CHECKPOINT" ] && [ -z "$DATA" ]; then usage_error "--checkpoint needs --data (its data-bin)"; fi
    if [ -z "$CHECKPOINT" ] && [ -n "$DATA" ]; then usage_error "--data goes with --checkpoint"; fi ;;
  '') usage_error "--scale small|paper is required" ;;
  *) usage_error "--scale must be small or paper, not '$SCALE'" ;;
esac
require_commands knnlm
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-results/xu2023-$SCALE}  # relative to the repository root: reports name no machine path
RUN_DIR=runs/xu2023-$SCALE
SUBSAMPLE_RATIOS=${SUBSAMPLE_RATIOS:-0.1 0.25 0.5}
[ "$SUBSAMPLE_RATIOS" != none ] || SUBSAMPLE_RATIOS=''
for r in $SUBSAMPLE_RATIOS; do
  [[ $r =~ ^0?[.][0-9]*[1-9][0-9]*$ ]] || usage_error "SUBSAMPLE_RATIOS: each ratio must be in (0, 1), not '$r'"
done
SUBSAMPLE_CACHES=${SUBSAMPLE_CACHES:-cache cache-exact}
for root in $SUBSAMPLE_CACHES; do
  case $root in cache | cache-exact) ;; *) usage_error "SUBSAMPLE_CACHES: cache and/or cache-exact, not '$root'" ;; esac
done
# the pipeline's defaults, which the rebuilt datastores' steps share
K_MAX=${K_MAX:-1024} MAX_TOKENS=${MAX_TOKENS:-8192} DEVICE=${DEVICE:-auto}
TEMPERATURES=${TEMPERATURES:-$(default_temperatures)}
TAU_OPTIONS=()
[ "$TEMPERATURES" = none ] || TAU_OPTIONS=(--temperature "$TEMPERATURES")

timed() {  # name command...: run it and log its seconds in the pipeline's timings.tsv
  local name=$1 t0=$SECONDS
  shift
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$RUN_DIR/timings.tsv"
}

reuse_ton2022() {  # ton2022-run: link its finished att datastore, att.l2 index and caches into RUN_DIR
  # (scripts/ton2022.sh evaluates the same checkpoint with the same windows and index); what RUN_DIR
  # holds already, from an earlier run, is kept
  local ton=$1 path ready
  for path in datastore/att index/att.l2.faiss index/att.l2.faiss.meta.json cache/valid cache/test; do
    case $path in
      datastore/* | cache/*) ready=$ton/$path/meta.json ;;
      *) ready=$ton/index/att.l2.faiss.meta.json ;;  # meta.json is written after the index
    esac
    [ -f "$ready" ] || continue
    if [ -e "$RUN_DIR/$path" ] || [ -L "$RUN_DIR/$path" ]; then continue; fi
    # a cache serves only if it holds the tokens this run evaluates
    if [[ $path == cache/* ]] && [ "$(dump_limit "$ton/$path")" != "${EVAL_LIMIT:-}" ]; then continue; fi
    mkdir -p "$(dirname "$RUN_DIR/$path")"
    ln -sr "$ton/$path" "$RUN_DIR/$path"
    echo "reusing $ton/$path (scripts/ton2022.sh)"
  done
}

drop_stale_run() {  # if RUN_DIR was scored with another checkpoint than CHECKPOINT (the model trained on,
  # e.g. under a new stopping rule), keep its old lines in OUT_DIR/superseded/ and delete its stale caches
  local was
  was=$(scored_with_other_checkpoint "$RUN_DIR/results.jsonl" "$CHECKPOINT") || return 0
  mkdir -p "$OUT_DIR/superseded"
  cp "$RUN_DIR/results.jsonl" "$OUT_DIR/superseded/results.$was.jsonl"
  if [ -f "$RUN_DIR/subsample/results.jsonl" ]; then
    cp "$RUN_DIR/subsample/results.jsonl" "$OUT_DIR/superseded/subsample.$was.jsonl"
  fi
  rm -rf "$RUN_DIR"
  echo "$CHECKPOINT changed since $RUN_DIR was scored (old lines in $OUT_DIR/superseded/): evaluating it again"
}

scaled_factory() {  # factory ratio: the factory with its IVF lists scaled by ratio (nearest power of two)
  local nlist
  nlist=$(echo "$1" | sed -n 's/^IVF\([0-9]*\),.*/\1/p')
  [ -n "$nlist" ] || { echo "$1"; return; }
  nlist=$(awk -v n="$nlist" -v r="$2" 'BEGIN {p = 1; while (p * 2 <= n * r * sqrt(2)) p *= 2; print p}')
  echo "$1" | sed "s/^IVF[0-9]*,/IVF$nlist,/"
}

rebuilt_datastore() {  # ratio: Figures 2/4 from an att datastore rebuilt from this ratio of the training tokens
  local r=$1 sub=$RUN_DIR/subsample/$1 root split
  [ -f "$sub/datastore/att/meta.json" ] || timed "subsample $r datastore" knnlm datastore build \
    --checkpoint "$CHECKPOINT" --data "$DATA" --out "$sub/datastore" --split train --key-types att \
    --tokens-per-sample "$TPS" --context-window "$CW" --max-tokens "$MAX_TOKENS" --subsample "$r" --device "$DEVICE"
  mkdir -p "$sub/index"
  [ -f "$sub/index/att.l2.faiss.meta.json" ] || timed "subsample $r index att.l2" knnlm index build \
    --datastore "$sub/datastore/att" --out "$sub/index/att.l2.faiss" --factory "$(scaled_factory "$FACTORY" "$r")" \
    --metric l2 --train-size "$TRAIN_SIZE" --nprobe "$NPROBE" --device "$DEVICE"
  for root in $SUBSAMPLE_CACHES; do
    [ "$root" = cache ] || [ "$EXACT_LIMIT" != 0 ] || continue
    for split in valid test; do
      # the pipeline's tokens and queries, without its neighbours (a cache holds one att-l2-faiss)
      [ -f "$sub/$root/$split/meta.json" ] || knnlm eval link --cache "$RUN_DIR/$root/$split" --out "$sub/$root/$split"
      [ -f "$sub/$root/$split/knn/att-l2-faiss/meta.json" ] || timed "subsample $r retrieve $root/$split att-l2-faiss" \
        knnlm eval retrieve --cache "$sub/$root/$split" --datastore "$sub/datastore/att" \
        --index "$sub/index/att.l2.faiss" --k-max "$K_MAX" --device "$DEVICE"
      if [ "$root" = cache-exact ] && [ ! -f "$sub/$root/$split/knn/att-l2-real/meta.json" ]; then
        timed "subsample $r retrieve $root/$split att-l2 exact" knnlm eval retrieve --cache "$sub/$root/$split" \
          --datastore "$sub/datastore/att" --similarity l2 --k-max "$K_MAX" --device "$DEVICE"
      fi
    done
  done
}

score_rebuilt() {  # out: score lines of the rebuilt datastores, and the score-time filter at their ratios
  local out=$1 r root cache options
  rm -f "$out"
  for r in $SUBSAMPLE_RATIOS; do
    for root in $SUBSAMPLE_CACHES; do
      cache=$RUN_DIR/subsample/$r/$root
      [ -f "$cache/valid/meta.json" ] || continue
      case $root in
        cache) options=(--label cache=full) ;;
        cache-exact) options=(--mask-source faiss,real --score-source faiss,real --label cache=exact) ;;
      esac
      knnlm score --valid-cache "$cache/valid" --test-cache "$cache/test" --out "$out" --key-type att \
        --similarity l2 --k "$K_MAX" "${TAU_OPTIONS[@]}" --skip-missing "${options[@]}" "${LABELS[@]}"
    done
  done
  # the score-time filter at the same ratios, on the full caches (the pipeline filters only the exact caches')
  # shellcheck disable=SC2086  # the ratios are split into words, then joined by commas
  knnlm score --valid-cache "$RUN_DIR/cache/valid" --test-cache "$RUN_DIR/cache/test" --out "$out" --key-type att \
    --similarity l2 --k "$K_MAX" --subsample-ratio "$(echo $SUBSAMPLE_RATIOS | tr ' ' ,)" "${TAU_OPTIONS[@]}" \
    --skip-missing --label cache=full "${LABELS[@]}"
}

tuned_tau() {  # results.jsonl: the τ at which att/L2 over all training tokens (FAISS, full caches) is best on valid
  knnlm report "$1" --best temperature --where labels.cache=full --where split=test --where key_type=att \
    --where similarity=l2 --where mask_source=faiss --where score_source=faiss --where datastore_fraction=1.0 \
    --where lambda=tune
}

if [ "$SCALE" = small ]; then
  DATA=data-bin/wikitext-2
  ensure_data "$DATA" wikitext-2 ${FROM:+--from "$FROM"}
  ckpt_dir=checkpoints/ton2022-small/wikitext-2/w0-s1  # shared with scripts/ton2022.sh --scale small
  train_lm small "$DATA" "$ckpt_dir" 0 1 activation_l2
  CHECKPOINT=$ckpt_dir/checkpoint_best.pt
  TPS=256 CW=128 FACTORY=IVF2048,PQ32 TRAIN_SIZE=200000 NPROBE=32 EXACT_LIMIT=${EXACT_LIMIT:-20000}
  drop_stale_run
  ton=runs/ton2022-small/wikitext-2/w0-s1  # linked only while it belongs to this checkpoint
  scored_with_other_checkpoint "$ton/results.jsonl" "$CHECKPOINT" > /dev/null || reuse_ton2022 "$ton"
else
  if [ -z "$CHECKPOINT" ]; then
    DATA=data-bin/wikitext-103-bpe32000
    ensure_data "$DATA" wikitext-103 --bpe sentencepiece --vocab-size 32000 ${FROM:+--from "$FROM"}
    ckpt_dir=checkpoints/xu2023-paper/wikitext-103-bpe32000/w0-s1
    # the preset's cutoffs (20000,60000) exceed a 32K vocabulary: one head of 20000, one tail cluster
    train_lm wiki103 "$DATA" "$ckpt_dir" 0 1 activation_l2 --adaptive-input-cutoff 20000 --adaptive-softmax-cutoff 20000
    CHECKPOINT=$ckpt_dir/checkpoint_best.pt
  fi
  [ -f "$CHECKPOINT" ] || die "no checkpoint $CHECKPOINT"
  [ -f "$DATA/dict.txt" ] || die "no $DATA/dict.txt: --data must be the checkpoint's data-bin"
  TPS=3072 CW=1536 FACTORY=IVF4096,PQ64 TRAIN_SIZE=1000000 NPROBE=32 EXACT_LIMIT=${EXACT_LIMIT:-0}
  drop_stale_run
fi

LABELS=(--label "dataset=$(basename "$DATA")")
run_pipeline "$CHECKPOINT" "$DATA" "$RUN_DIR" KEY_TYPES=att,ffn METRICS=l2,ip TPS="$TPS" CW="$CW" \
  FACTORY="$FACTORY" TRAIN_SIZE="$TRAIN_SIZE" NPROBE="$NPROBE" EVAL_LIMIT="${EVAL_LIMIT:-}" \
  EXACT_LIMIT="$EXACT_LIMIT" SCORE_ARGS="${LABELS[*]}"

RESULTS=("$RUN_DIR/results.jsonl")
if [ -n "$SUBSAMPLE_RATIOS" ]; then
  for r in $SUBSAMPLE_RATIOS; do
    step "datastore rebuilt from $r of the training tokens -> $RUN_DIR/subsample/$r"
    rebuilt_datastore "$r"
  done
  step "score the rebuilt datastores -> $RUN_DIR/subsample/results.jsonl"
  score_rebuilt "$RUN_DIR/subsample/results.jsonl" 2>&1 | { grep -v "^INFO\|faiss.loader" || true; }
  RESULTS+=("$RUN_DIR/subsample/results.jsonl")
fi

step "report -> $OUT_DIR"
parts=$(knnlm report --list | awk '$1 ~ /^xu2023_/ && $1 != "xu2023_table4" { print $1 }' | paste -sd, -)
[ -n "$parts" ] || die "knnlm report --list shows no xu2023_* part"
# the result lines, step timings and artifact sizes are kept beside the report (committed with it)
mkdir -p "$OUT_DIR"
for file in "${RESULTS[@]}"; do [ ! -f "$file" ] || cat "$file"; done > "$OUT_DIR/results.jsonl"
for file in timings.tsv sizes.txt; do [ ! -f "$RUN_DIR/$file" ] || cp "$RUN_DIR/$file" "$OUT_DIR/$file"; done
# the full caches and the exact-neighbour caches hold different tokens: one report each
has_exact=0
if grep -q '"cache": "exact"' "$OUT_DIR/results.jsonl"; then has_exact=1; fi
knnlm report "$OUT_DIR/results.jsonl" --out "$OUT_DIR" --only "$parts" --where labels.cache=full
if [ "$has_exact" = 1 ]; then
  knnlm report "$OUT_DIR/results.jsonl" --out "$OUT_DIR/exact" --only "$parts" --where labels.cache=exact
fi
# at τ = 1 an unregularized small model's kNN part is nearly one-hot (its keys' ‖r‖² are in the
# hundreds): the datastore-size and FAISS-vs-exact comparisons again at the τ tuned on valid
tau=$(tuned_tau "$OUT_DIR/results.jsonl")
if [ -n "$tau" ] && [ "$tau" != 1.0 ]; then
  step "Tables 1/3 and Figures 2/4 at the tuned τ = $tau -> $OUT_DIR/tuned-tau"
  knnlm report "$OUT_DIR/results.jsonl" --out "$OUT_DIR/tuned-tau" --only xu2023_table1,xu2023_figure2_4 \
    --where labels.cache=full --where temperature="$tau"
  if [ "$has_exact" = 1 ]; then
    knnlm report "$OUT_DIR/results.jsonl" --out "$OUT_DIR/exact/tuned-tau" --only xu2023_table3,xu2023_figure2_4 \
      --where labels.cache=exact --where temperature="$tau"
  fi
fi
echo "report: $OUT_DIR/report.md (and $OUT_DIR/exact/ for FAISS vs exact neighbours)"
