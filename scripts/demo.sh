#!/usr/bin/env bash
# The main job on the bundled corpus (a WikiText-2 slice), CPU only:
#   prepare -> train the tiny LM -> its perplexity -> att/ffn datastores -> FAISS indexes (L2, IP)
#   -> per-token caches of valid/test -> retrievals -> knnlm score -> the Table-1-style table.
# Outputs go to $DEMO_DIR (default runs/demo); rerunning reuses what is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
MAX_UPDATE=${MAX_UPDATE:-400}
USER_DIR=$PWD/knnlm
DATA=$DEMO_DIR/data-bin/demo
CKPT_DIR=$DEMO_DIR/checkpoints
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$DEMO_DIR"

step() { printf '\n== %s\n' "$*"; }

step "1/4 prepare the bundled corpus -> $DATA"
[ -f "$DATA/meta.json" ] || knnlm prepare demo --dest "$DEMO_DIR/data-bin"

step "2/4 train knnlm_transformer_lm_tiny for $MAX_UPDATE updates -> $CKPT_DIR"
# unbuffered, and grep line by line: each logged step shows as it happens, not at the end
PYTHONUNBUFFERED=1 fairseq-train "$DATA" --user-dir "$USER_DIR" --task language_modeling \
  --arch knnlm_transformer_lm_tiny --tokens-per-sample 128 --sample-break-mode none \
  --max-tokens 2048 --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.1 --lr 0.002 \
  --lr-scheduler inverse_sqrt --warmup-updates 200 --warmup-init-lr 1e-07 \
  --max-update "$MAX_UPDATE" --seed 1 --cpu --num-workers 0 --save-dir "$CKPT_DIR" \
  --no-epoch-checkpoints --disable-validation --log-format simple --log-interval 50 2>&1 \
  | grep --line-buffered -E "train_inner|\| train \||done training" || true
[ -f "$CKPT_DIR/checkpoint_last.pt" ] || { echo "training did not write $CKPT_DIR/checkpoint_last.pt" >&2; exit 1; }

step "3/4 validation perplexity (fairseq-eval-lm, context window 64)"
fairseq-eval-lm "$DATA" --user-dir "$USER_DIR" --path "$CKPT_DIR/checkpoint_last.pt" \
  --gen-subset valid --tokens-per-sample 128 --context-window 64 --max-tokens 4096 \
  --cpu --num-workers 0 2>&1 | grep -E "Evaluated|Loss \(base 2\)"

step "4/4 kNN-LM: datastores, indexes, caches, scores, report -> $DEMO_DIR/knnlm"
LOG=$DEMO_DIR/knnlm.log
if ! CKPT=$CKPT_DIR/checkpoint_last.pt DATA=$DATA OUT=$DEMO_DIR/knnlm KEY_TYPES=att,ffn METRICS=l2,ip \
  TPS=128 CW=64 FACTORY=auto TRAIN_SIZE=100000 NPROBE=32 K_MAX=1024 EXACT_LIMIT=${EXACT_LIMIT:-2000} DEVICE=cpu \
  bash scripts/knnlm_pipeline.sh > "$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  echo "the kNN-LM pipeline failed; its full log is $LOG" >&2
  exit 1
fi
column -t -s $'\t' "$DEMO_DIR/knnlm/timings.tsv"
printf '\n'
cat "$DEMO_DIR/knnlm/report/xu2023_table1.md"
printf '\nAll results: %s and %s-exact (report.md, tables, figures)\n' "$DEMO_DIR/knnlm/report" "$DEMO_DIR/knnlm/report"
