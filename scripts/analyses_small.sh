#!/usr/bin/env bash
# The analyses of both papers on the small-scale WikiText-2 runs (scripts/ton2022.sh and
# scripts/xu2023.sh at --scale small), written to results/analyses-small/.
#   RUNS: the runs folder (default runs); W0/W1: the ω=0 and ω=1 pipeline outputs;
#   XU: the xu2023 pipeline output (with exact neighbours); TINY_CKPT: a plain-softmax checkpoint
#   for the stolen-probabilities check (the small models use an adaptive softmax).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data-bin/wikitext-2}
W0=${W0:-runs/ton2022-small/wikitext-2/w0-s1}
W1=${W1:-runs/ton2022-small/wikitext-2/w1-s1}
XU=${XU:-runs/xu2023-small}
TINY_CKPT=${TINY_CKPT:-runs/demo/checkpoints/checkpoint_last.pt}
TINY_DATA=${TINY_DATA:-runs/demo/data-bin/demo}
OUT=${OUT:-results/analyses-small}
LAMBDA=${LAMBDA:-0.3}
mkdir -p "$OUT"

knnlm analyze frequency --cache "$W0/cache/valid" --cache "$W1/cache/valid" --label 'ω=0' --label 'ω=1' \
  --data-bin "$DATA" --lambda "$LAMBDA" --out "$OUT"
knnlm analyze clustering --cache "$W0/cache/valid" --cache "$W1/cache/valid" --label 'ω=0' --label 'ω=1' \
  --data-bin "$DATA" --lambda "$LAMBDA" --out "$OUT"
knnlm analyze benefit --cache "$XU/cache-exact/test" --data-bin "$DATA" --out "$OUT"
knnlm analyze position --cache "$XU/cache/test" --lambda "$LAMBDA" --bucket-size 16 --out "$OUT"
knnlm analyze stolen --weights "$TINY_CKPT" --data-bin "$TINY_DATA" --out "$OUT"
ls -1 "$OUT"
