#!/usr/bin/env bash
# Ton et al. (2022), "Regularized Training of Nearest Neighbor Language Models": Tables 1-2 and Figure 1.
# Per ω and seed: train with the activation-L2 penalty on the att key, evaluate the kNN-LM with
# scripts/knnlm_pipeline.sh (att keys, L2), then render `knnlm report --only ton2022_table,ton2022_figure1`.
# Completed trainings and pipeline steps are reused, so an interrupted run can simply be restarted.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/ton2022.sh --scale small|paper [options]

Reproduce Tables 1-2 and Figure 1 of Ton et al. (2022): one model per ω and seed trained with
--criterion activation_l2 --activation-weight ω --knn-key att, each evaluated as a kNN-LM
(att keys, L2, k=1024, valid split, λ=0.3 and tuned), then mean ± std over seeds per ω.

Scales:
  small   CPU: WikiText-2 (word level), knnlm_transformer_lm_small, EPOCHS (default 1) epochs,
          first EVAL_LIMIT (default 50000) tokens of valid/test. Defaults: --omegas "0 1 10" --seeds "1".
  paper   GPU: WikiText-2 with knnlm_transformer_lm_wiki2 (Table 1) and WikiText-103 with
          knnlm_transformer_lm_wiki103 (Table 2), Baevski & Auli's recipe (see scripts/lib.sh),
          IVF4096,PQ64 indexes. Defaults: --omegas "0 0.1 1 2 5 10" --seeds "1 2 3 4 5".

Options:
  --scale small|paper   required
  --omegas "W ..."      regularization weights ω (space-separated)
  --seeds "S ..."       training seeds
  --datasets "D ..."    paper scale only: wikitext-2 and/or wikitext-103 (default: both)
  --from DIR|ZIP        offline WikiText copy for `knnlm prepare` (one dataset only)
  --out DIR             report folder (default results/ton2022-<scale>)
  -h, --help            this text

Outputs: checkpoints/ton2022-<scale>/<dataset>/w<ω>-s<seed>/ (train.log, checkpoint_best.pt),
runs/ton2022-<scale>/<dataset>/w<ω>-s<seed>/ (pipeline), <out>/results.jsonl and <out>/report.md.
Environment: EPOCHS, EVAL_LIMIT, GPUS (paper: GPUs per training; default all that nvidia-smi lists),
WIKI2_MAX_UPDATE/WIKI2_WARMUP (paper WikiText-2 schedule), and the variables of scripts/knnlm_pipeline.sh.
EOF
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

SCALE='' OMEGAS='' SEEDS='' DATASETS='' FROM='' OUT_DIR=''
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --scale) need_value "$1" $#; SCALE=$2; shift 2 ;;
    --omegas) need_value "$1" $#; OMEGAS=$2; shift 2 ;;
    --seeds) need_value "$1" $#; SEEDS=$2; shift 2 ;;
    --datasets) need_value "$1" $#; DATASETS=$2; shift 2 ;;
    --from) need_value "$1" $#; FROM=$(abspath "$2"); shift 2 ;;
    --out) need_value "$1" $#; OUT_DIR=$(abspath "$2"); shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done

case $SCALE in
  small)
    [ -z "$DATASETS" ] || [ "$DATASETS" = wikitext-2 ] || usage_error "--scale small runs wikitext-2 only"
    DATASETS=wikitext-2 OMEGAS=${OMEGAS:-"0 1 10"} SEEDS=${SEEDS:-1} ;;
  paper)
    DATASETS=${DATASETS:-"wikitext-2 wikitext-103"} OMEGAS=${OMEGAS:-"0 0.1 1 2 5 10"} SEEDS=${SEEDS:-"1 2 3 4 5"} ;;
  '') usage_error "--scale small|paper is required" ;;
  *) usage_error "--scale must be small or paper, not '$SCALE'" ;;
esac
read -r -a DATASET_LIST <<< "$DATASETS"
for dataset in "${DATASET_LIST[@]}"; do
  case $dataset in wikitext-2 | wikitext-103) ;; *) usage_error "unknown dataset '$dataset'" ;; esac
done
[ -z "$FROM" ] || [ ${#DATASET_LIST[@]} -eq 1 ] || usage_error "--from needs a single dataset (--datasets)"
for omega in $OMEGAS; do [[ $omega =~ ^[0-9]+([.][0-9]+)?$ ]] || usage_error "ω must be a number >= 0, not '$omega'"; done
for seed in $SEEDS; do [[ $seed =~ ^[0-9]+$ ]] || usage_error "a seed must be an integer, not '$seed'"; done
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-$PWD/results/ton2022-$SCALE}

recipe_of() {  # dataset: the training recipe of set_train_args at this scale
  if [ "$SCALE" = small ]; then echo small; elif [ "$1" = wikitext-2 ]; then echo wiki2; else echo wiki103; fi
}

pipeline_settings() {  # the scripts/knnlm_pipeline.sh variables of this scale (att keys, L2 only)
  if [ "$SCALE" = small ]; then
    echo "TPS=256 CW=128 EVAL_LIMIT=${EVAL_LIMIT:-50000}"
  else
    echo "TPS=3072 CW=1536 FACTORY=IVF4096,PQ64 TRAIN_SIZE=1000000 NPROBE=32 EVAL_LIMIT=${EVAL_LIMIT:-}"
  fi
}

run_one() {  # dataset omega seed: train (or reuse), evaluate, and append the run's results file to RESULTS
  local dataset=$1 omega=$2 seed=$3 name ckpt_dir run_dir ppl
  name=w$omega-s$seed
  ckpt_dir=checkpoints/ton2022-$SCALE/$dataset/$name
  run_dir=runs/ton2022-$SCALE/$dataset/$name
  train_lm "$(recipe_of "$dataset")" "data-bin/$dataset" "$ckpt_dir" "$omega" "$seed"
  ppl=$(train_ppl "$ckpt_dir/train.log")
  local labels="--label omega=$omega --label seed=$seed --label dataset=$dataset"
  if [ -n "$ppl" ]; then
    labels+=" --label train_ppl=$ppl"
  else
    echo "warning: no '| train |' ppl in $ckpt_dir/train.log; the table will show train ppl as missing" >&2
  fi
  # shellcheck disable=SC2046  # the settings are VAR=VALUE words without spaces
  run_pipeline "$ckpt_dir/checkpoint_best.pt" "data-bin/$dataset" "$run_dir" \
    KEY_TYPES=att METRICS=l2 EXACT_LIMIT=0 $(pipeline_settings) SCORE_ARGS="$labels"
  RESULTS+=("$run_dir/results.jsonl")
}

RESULTS=()
for dataset in "${DATASET_LIST[@]}"; do
  ensure_data "data-bin/$dataset" "$dataset" ${FROM:+--from "$FROM"}
  for omega in $OMEGAS; do
    for seed in $SEEDS; do
      run_one "$dataset" "$omega" "$seed"
    done
  done
done

step "report -> $OUT_DIR"
mkdir -p "$OUT_DIR"
cat "${RESULTS[@]}" > "$OUT_DIR/results.jsonl"
knnlm report "$OUT_DIR/results.jsonl" --out "$OUT_DIR" --only ton2022_table,ton2022_figure1
echo "report: $OUT_DIR/report.md (table: $OUT_DIR/ton2022_table.md)"
