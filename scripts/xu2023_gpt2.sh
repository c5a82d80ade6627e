#!/usr/bin/env bash
# Xu, Alon & Neubig (2023), Appendix A, Table 4: kNN-LM on pretrained GPT-2 models (Hugging Face
# checkpoints fine-tuned on WikiText-103) through the same pipeline as fairseq models
# (scripts/knnlm_pipeline.sh with HF_MODEL). Completed steps are reused: rerun to resume.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/xu2023_gpt2.sh [options]

For each model: an att datastore of WikiText-103 train (GPT-2 tokens, windows of 1024 sliding by 512),
an IVF4096,PQ64 L2 index (nprobe 32), caches of valid and test, k = 1024, τ = 1; then the table
xu2023_table4 (validation, λ = 0.25 as in the paper; the score lines also hold λ tuned on valid and
reported on test), per GPT-2 token and per word.

Options:
  --models "LIST"   any of distilgpt2 gpt2 gpt2-medium gpt2-large (default: all four)
  --data DIR        folder with wiki.{train,valid,test}.raw (unzipped wikitext-103-raw-v1)
  --from ZIP        offline copy of wikitext-103-raw-v1.zip (unzipped into data/wikitext-103-raw)
  --out DIR         report folder (default results/xu2023-gpt2)
  -h, --help        this text

Models are the neulab/*-finetuned-wikitext103 checkpoints, downloaded by transformers when online;
with HF_HUB_OFFLINE=1 they must be in the local Hugging Face cache, and the script stops before any
work if one is not. Without --data/--from the corpus is downloaded from wikitext.smerity.com.
Needs a GPU in practice and about 180 GB of disk per 768-d model for the fp16 keys (117M tokens).
Environment: EVAL_LIMIT (first N tokens of valid/test), DEVICE, and the variables of
scripts/knnlm_pipeline.sh.
USAGE
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

MODELS="distilgpt2 gpt2 gpt2-medium gpt2-large" DATA='' FROM='' OUT_DIR=''
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --models) need_value "$1" $#; MODELS=$2; shift 2 ;;
    --data) need_value "$1" $#; DATA=$(abspath "$2"); shift 2 ;;
    --from) need_value "$1" $#; FROM=$(abspath "$2"); shift 2 ;;
    --out) need_value "$1" $#; OUT_DIR=$(abspath "$2"); shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
require_commands knnlm
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-$PWD/results/xu2023-gpt2}
RUN_DIR=runs/xu2023-gpt2

hub_name() {  # short name -> the fine-tuned checkpoint on the Hugging Face hub
  case $1 in
    distilgpt2) echo neulab/distilgpt2-finetuned-wikitext103 ;;
    gpt2) echo neulab/gpt2-finetuned-wikitext103 ;;
    gpt2-medium) echo neulab/gpt2-med-finetuned-wikitext103 ;;
    gpt2-large) echo neulab/gpt2-large-finetuned-wikitext103 ;;
    *) usage_error "unknown model '$1' (choose from distilgpt2 gpt2 gpt2-medium gpt2-large)" ;;
  esac
}

step "check that every model can be loaded"
for m in $MODELS; do
  name=$(hub_name "$m")
  python - "$name" <<'PY' || die "cannot get $name (see above)"
import sys
from knnlm.errors import KnnlmError
from knnlm.models.hf import check_available
try:
    print(f"{sys.argv[1]}: from the {check_available(sys.argv[1])}")
except KnnlmError as err:
    sys.exit(f"error: {err}")
PY
done

if [ -z "$DATA" ]; then
  DATA=data/wikitext-103-raw
  if [ ! -f "$DATA/wiki.test.raw" ]; then
    zip=${FROM:-data/wikitext-103-raw-v1.zip}
    if [ ! -f "$zip" ]; then
      step "download wikitext-103-raw-v1.zip"
      mkdir -p data
      curl -fL --retry 3 -o "$zip.part" https://wikitext.smerity.com/wikitext-103-raw-v1.zip \
        || die "cannot download WikiText-103 (offline?); pass --data DIR or --from ZIP"
      mv "$zip.part" "$zip"
    fi
    python - "$zip" "$DATA" <<'PY'
import sys, zipfile
from pathlib import Path
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(sys.argv[1]) as z:
    for split in ("train", "valid", "test"):
        member = next(n for n in z.namelist() if n.endswith(f"wiki.{split}.raw"))
        (out / f"wiki.{split}.raw").write_bytes(z.read(member))
PY
  fi
fi
for split in train valid test; do
  [ -f "$DATA/wiki.$split.raw" ] || die "no $DATA/wiki.$split.raw: --data must hold the raw WikiText-103 splits"
done

for m in $MODELS; do
  name=$(hub_name "$m")
  step "evaluate $name -> $RUN_DIR/$m"
  env KEY_TYPES=att METRICS=l2 TPS=1024 CW=512 MAX_TOKENS="${MAX_TOKENS:-8192}" FACTORY=IVF4096,PQ64 \
    TRAIN_SIZE=1000000 NPROBE=32 K_MAX=1024 EVAL_LIMIT="${EVAL_LIMIT:-}" EXACT_LIMIT=0 \
    SCORE_ARGS="--label model=$m" HF_MODEL="$name" DATA="$DATA" OUT="$RUN_DIR/$m" bash scripts/knnlm_pipeline.sh
done

step "report -> $OUT_DIR"
results=()
for m in $MODELS; do results+=("$RUN_DIR/$m/results.jsonl"); done
knnlm report "${results[@]}" --out "$OUT_DIR" --only xu2023_table4 --where labels.cache=full
echo "report: $OUT_DIR/report.md"
