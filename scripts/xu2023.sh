#!/usr/bin/env bash
# Xu, Alon & Neubig (2023), "Why do Nearest Neighbor Language Models Work?": the tables and figures
# of `knnlm report` (xu2023_*) from one LM: att/ffn keys x L2/IP, FAISS vs exact neighbours and
# scores, temperature and datastore-fraction sweeps (scripts/knnlm_pipeline.sh does the work).
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
          EXACT_LIMIT (default 20000).
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

Outputs: runs/xu2023-<scale>/ (pipeline: datastores, indexes, caches, results.jsonl) and
<out>/report.md with the xu2023_* parts. Environment: EPOCHS, EVAL_LIMIT, EXACT_LIMIT, GPUS,
and the variables of scripts/knnlm_pipeline.sh.
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
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-$PWD/results/xu2023-$SCALE}
RUN_DIR=runs/xu2023-$SCALE

if [ "$SCALE" = small ]; then
  DATA=data-bin/wikitext-2
  ensure_data "$DATA" wikitext-2 ${FROM:+--from "$FROM"}
  ckpt_dir=checkpoints/ton2022-small/wikitext-2/w0-s1  # shared with scripts/ton2022.sh --scale small
  train_lm small "$DATA" "$ckpt_dir" 0 1 activation_l2
  CHECKPOINT=$ckpt_dir/checkpoint_best.pt
  SETTINGS=(TPS=256 CW=128 FACTORY=IVF2048,PQ32 TRAIN_SIZE=200000 NPROBE=32 EVAL_LIMIT="${EVAL_LIMIT:-}"
    EXACT_LIMIT="${EXACT_LIMIT:-20000}")
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
  SETTINGS=(TPS=3072 CW=1536 FACTORY=IVF4096,PQ64 TRAIN_SIZE=1000000 NPROBE=32
    EVAL_LIMIT="${EVAL_LIMIT:-}" EXACT_LIMIT="${EXACT_LIMIT:-0}")
fi

run_pipeline "$CHECKPOINT" "$DATA" "$RUN_DIR" KEY_TYPES=att,ffn METRICS=l2,ip "${SETTINGS[@]}" \
  SCORE_ARGS="--label dataset=$(basename "$DATA")"

step "report -> $OUT_DIR"
parts=$(knnlm report --list | awk '$1 ~ /^xu2023_/ && $1 != "xu2023_table4" { print $1 }' | paste -sd, -)
[ -n "$parts" ] || die "knnlm report --list shows no xu2023_* part"
# the full caches and the exact-neighbour caches hold different tokens: one report each
knnlm report "$RUN_DIR/results.jsonl" --out "$OUT_DIR" --only "$parts" --where labels.cache=full
if grep -q '"cache": "exact"' "$RUN_DIR/results.jsonl"; then
  knnlm report "$RUN_DIR/results.jsonl" --out "$OUT_DIR/exact" --only "$parts" --where labels.cache=exact
fi
echo "report: $OUT_DIR/report.md (and $OUT_DIR/exact/ for FAISS vs exact neighbours)"
