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
--criterion activation_l2 --activation-weight ω --knn-key att (ω = 0 is the baseline, so every model
has the same exact cross-entropy), plus the Eq. 1 row (--criterion moco_queue), each evaluated as a
kNN-LM (att keys, L2, k=1024, valid split, λ=0.3 and tuned), then mean ± std over seeds per ω.

Scales:
  small   CPU: WikiText-2 (word level), knnlm_transformer_lm_small trained one epoch at a time until
          the validation perplexity plateaus: PATIENCE (default 3) epochs in a row each lower the
          best so far by less than MIN_GAIN (default 0.01, i.e. 1%), never before MIN_EPOCHS
          (default 3: a large ω collapses the keys in the first epochs, and the validation
          perplexity may rise meanwhile); at most EPOCHS (default 60). MIN_GAIN=0 PATIENCE=3
          MIN_EPOCHS=1 is fairseq's --patience 3. A model finished under another rule trains on
          until this one stops it, and is evaluated again if its checkpoint_best.pt changed (its
          old result lines move to OUT/superseded/). Full valid and test splits (EVAL_LIMIT
          to cut them). Default models, in this order: ω ∈ {0, 1} × seeds
          {1, 2, 3}, ω ∈ {0.1, 10} × seed 1, moco_queue ω = 1 × seed 1.
  paper   GPU: WikiText-2 with knnlm_transformer_lm_wiki2 (Table 1) and WikiText-103 with
          knnlm_transformer_lm_wiki103 (Table 2), Baevski & Auli's recipe (see scripts/lib.sh),
          IVF4096,PQ64 indexes. Defaults: --omegas "0 0.1 1 2 5 10" --seeds "1 2 3 4 5".

Options:
  --scale small|paper   required
  --omegas "W ..."      regularization weights ω (space-separated); with --seeds: their cross product
  --seeds "S ..."       training seeds
  --moco                also train the Eq. 1 model (moco_queue, ω = 1, first seed); default at small scale
                        without --omegas/--seeds
  --no-moco             leave it out
  --models "NAME ..."   train and evaluate only these models of the set, by name (w<ω>-s<seed>,
                        moco-w1-s<seed>): finishing one model on a machine that lacks the others;
                        the report and the analyses still cover every model kept so far
  --datasets "D ..."    paper scale only: wikitext-2 and/or wikitext-103 (default: both)
  --from DIR|ZIP        offline WikiText copy for `knnlm prepare` (one dataset only)
  --out DIR             report folder (default results/ton2022-<scale>)
  --report-only         train and evaluate nothing: render the report from the models finished so far
  --train-only          train (or train on) the models and evaluate nothing, render no report: a model
                        trained over several sittings (TRAIN_DEADLINE) is scored once, when it has
                        stopped, by the same call without this flag; its kept lines stay until then
  -h, --help            this text

Every finished model is skipped on a rerun and an interrupted training resumes from its
checkpoint_last.pt, so the set can be completed over several sittings; the report is rendered from
the models finished so far, and each one's result lines are kept in <out>/models/<name>.jsonl.

Disk: the retrieved neighbours (k = 1024) of one model's valid and test splits take 5.7 GB at small
scale. Only the first seed's activation_l2 models need them afterwards (the analyses), so the other
models' neighbours (runs/.../<name>/cache/*/knn) are deleted once their result lines are kept, and a
model whose lines are kept is not evaluated again (delete <out>/models/<dataset>.<name>.jsonl to
evaluate it anew). KEEP_NEIGHBOURS=all keeps every model's neighbours.

Outputs: checkpoints/ton2022-<scale>/<dataset>/<name>/ (train.log, checkpoint_best.pt),
runs/ton2022-<scale>/<dataset>/<name>/ (pipeline), <out>/results.jsonl, <out>/training.tsv, <out>/report.md,
<out>/models/<dataset>.<name>.{jsonl,tsv,log} (result lines, training facts, end-of-epoch log lines),
<out>/training/ (knnlm analyze training: validation perplexity and key norm by epoch of every finished model),
<out>/temperature/ (knnlm analyze temperature over the first seed's models, with the ω = 0 LM shared),
<out>/analyses/ (Figure 2 and the clustering analysis, ω = 0 vs ω = 1); with two datasets the last
three folders get a -<dataset> suffix.
Environment: EPOCHS, PATIENCE, MIN_GAIN, MIN_EPOCHS, TRAIN_DEADLINE (a `date +%s` time: an epoch starts
only if the one before it would still end in time, and is cut at it; the model is evaluated, and a
later call trains it on), EVAL_LIMIT, KEEP_NEIGHBOURS (first-seed|all), TEMPERATURES (every model's
τ sweep, default 0.001-0.05 then scripts/lib.sh default_temperatures), GPUS (paper: GPUs per training; default all that nvidia-smi
lists), WIKI2_MAX_UPDATE/WIKI2_WARMUP (paper WikiText-2 schedule), and the variables of
scripts/knnlm_pipeline.sh.
EOF
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

SCALE='' OMEGAS='' SEEDS='' DATASETS='' FROM='' OUT_DIR='' MOCO='' REPORT_ONLY=0 TRAIN_ONLY=0 RUN_NAMES=''
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --scale) need_value "$1" $#; SCALE=$2; shift 2 ;;
    --omegas) need_value "$1" $#; OMEGAS=$2; shift 2 ;;
    --seeds) need_value "$1" $#; SEEDS=$2; shift 2 ;;
    --moco) MOCO=1; shift ;;
    --no-moco) MOCO=0; shift ;;
    --models) need_value "$1" $#; RUN_NAMES=$2; shift 2 ;;
    --datasets) need_value "$1" $#; DATASETS=$2; shift 2 ;;
    --from) need_value "$1" $#; FROM=$(abspath "$2"); shift 2 ;;
    --out) need_value "$1" $#; OUT_DIR=$(abspath "$2"); shift 2 ;;
    --report-only) REPORT_ONLY=1; shift ;;
    --train-only) TRAIN_ONLY=1; shift ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done

case $SCALE in
  small)
    [ -z "$DATASETS" ] || [ "$DATASETS" = wikitext-2 ] || usage_error "--scale small runs wikitext-2 only"
    DATASETS=wikitext-2 ;;
  paper)
    DATASETS=${DATASETS:-"wikitext-2 wikitext-103"} OMEGAS=${OMEGAS:-"0 0.1 1 2 5 10"} SEEDS=${SEEDS:-"1 2 3 4 5"}
    MOCO=${MOCO:-0} ;;
  '') usage_error "--scale small|paper is required" ;;
  *) usage_error "--scale must be small or paper, not '$SCALE'" ;;
esac
[ "$REPORT_ONLY$TRAIN_ONLY" != 11 ] || usage_error "--report-only and --train-only exclude each other"
read -r -a DATASET_LIST <<< "$DATASETS"
for dataset in "${DATASET_LIST[@]}"; do
  case $dataset in wikitext-2 | wikitext-103) ;; *) usage_error "unknown dataset '$dataset'" ;; esac
done
[ -z "$FROM" ] || [ ${#DATASET_LIST[@]} -eq 1 ] || usage_error "--from needs a single dataset (--datasets)"
# the models, as criterion:ω:seed, in the order they are trained (the most needed first)
MODELS=()
if [ "$SCALE" = small ] && [ -z "$OMEGAS$SEEDS" ]; then
  MODELS=(activation_l2:0:1 activation_l2:1:1 activation_l2:0:2 activation_l2:1:2 activation_l2:0:3
    activation_l2:1:3 activation_l2:0.1:1 activation_l2:10:1)
  MOCO=${MOCO:-1}  # the issue's whole set; with --omegas/--seeds only when asked (--moco)
else
  OMEGAS=${OMEGAS:-"0 1 10"} SEEDS=${SEEDS:-1}
  for seed in $SEEDS; do for omega in $OMEGAS; do MODELS+=("activation_l2:$omega:$seed"); done; done
fi
FIRST_SEED=${SEEDS%% *}
KEEP_NEIGHBOURS=${KEEP_NEIGHBOURS:-first-seed}
case $KEEP_NEIGHBOURS in
  first-seed | all) ;;
  *) usage_error "KEEP_NEIGHBOURS must be first-seed or all, not '$KEEP_NEIGHBOURS'" ;;
esac
if [ "$MOCO" = 1 ]; then MODELS+=("moco_queue:1:${FIRST_SEED:-1}"); fi
# the models this call trains and evaluates: the set, or the part of it that --models names
TO_RUN=("${MODELS[@]}")
if [ -n "$RUN_NAMES" ]; then
  SET_NAMES=()
  for model in "${MODELS[@]}"; do
    IFS=: read -r criterion omega seed <<< "$model"
    SET_NAMES+=("$(model_name "$criterion" "$omega" "$seed")")
  done
  TO_RUN=()
  for name in $RUN_NAMES; do
    found=''
    for i in "${!MODELS[@]}"; do [ "${SET_NAMES[i]}" != "$name" ] || { TO_RUN+=("${MODELS[i]}"); found=1; }; done
    [ -n "$found" ] || usage_error "--models: '$name' is not a model of this set (its models: ${SET_NAMES[*]})"
  done
fi
for omega in $OMEGAS; do [[ $omega =~ ^[0-9]+([.][0-9]+)?$ ]] || usage_error "ω must be a number >= 0, not '$omega'"; done
for seed in $SEEDS; do [[ $seed =~ ^[0-9]+$ ]] || usage_error "a seed must be an integer, not '$seed'"; done
require_commands knnlm
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-results/ton2022-$SCALE}  # relative to the repository root: reports name no machine path

recipe_of() {  # dataset: the training recipe of set_train_args at this scale
  if [ "$SCALE" = small ]; then echo small; elif [ "$1" = wikitext-2 ]; then echo wiki2; else echo wiki103; fi
}

# every model's τ sweep (the table's tuned-τ column), down to 0.001: keys shrunk by ω = 1 are best near 0.002
TAU_SWEEP=${TEMPERATURES:-0.001,0.002,0.005,0.01,0.02,0.05,$(default_temperatures)}

pipeline_settings() {  # the scripts/knnlm_pipeline.sh variables of this scale (att keys, L2 only)
  if [ "$SCALE" = small ]; then
    echo "TPS=256 CW=128 FACTORY=IVF2048,PQ32 TRAIN_SIZE=200000 NPROBE=32 EVAL_LIMIT=${EVAL_LIMIT:-} TEMPERATURES=$TAU_SWEEP"
  else
    echo "TPS=3072 CW=1536 FACTORY=IVF4096,PQ64 TRAIN_SIZE=1000000 NPROBE=32 EVAL_LIMIT=${EVAL_LIMIT:-}" \
      "TEMPERATURES=$TAU_SWEEP"
  fi
}

keeps_neighbours() {  # criterion seed: true if the analyses need this model's retrieved neighbours later
  [ "$KEEP_NEIGHBOURS" = all ] || { [ "$1" = activation_l2 ] && [ "$2" = "${FIRST_SEED:-1}" ]; }
}

keep_epoch_lines() {  # checkpoint-dir kept-prefix: the training log's end-of-epoch lines (the curves' input)
  grep -F -e '| train |' -e '| valid |' "$1/train.log" > "$2.log" || true
}

keep_training_facts() {  # dataset criterion omega seed checkpoint-dir kept-prefix: one row of training facts
  # (summed train_wall, best epoch and its valid ppl, last train ppl) and the end-of-epoch log lines
  local best
  best=$(best_valid "$5/train.log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" \
    "$(train_seconds "$5")" "${best% *}" "${best#* }" "$(train_ppl "$5/train.log")" > "$6.tsv"
  keep_epoch_lines "$5" "$6"
}

supersede_if_retrained() {  # name checkpoint kept-prefix run-dir: if the kept result lines were scored with
  # another checkpoint (the model trained on, e.g. under a new stopping rule), move them to superseded/ and
  # delete the run's caches, which belong to a checkpoint that no longer exists, so that it is evaluated again
  local name=$1 ckpt=$2 kept=$3 run_dir=$4 was ext
  was=$(scored_with_other_checkpoint "$kept.jsonl" "$ckpt") || return 0
  mkdir -p "$OUT_DIR/superseded"
  for ext in jsonl tsv log; do
    [ ! -f "$kept.$ext" ] || mv "$kept.$ext" "$OUT_DIR/superseded/$(basename "$kept").$was.$ext"
  done
  rm -rf "$run_dir"
  echo "$name: $ckpt changed since its results were scored (they are in $OUT_DIR/superseded/);" \
    "its run caches ($run_dir) are deleted and it is evaluated again"
}

run_one() {  # dataset criterion omega seed: train (or reuse), evaluate, keep the run's result lines
  local dataset=$1 criterion=$2 omega=$3 seed=$4 name ckpt_dir run_dir ppl kept
  name=$(model_name "$criterion" "$omega" "$seed")
  ckpt_dir=checkpoints/ton2022-$SCALE/$dataset/$name
  run_dir=runs/ton2022-$SCALE/$dataset/$name
  kept=$OUT_DIR/models/$dataset.$name
  train_lm "$(recipe_of "$dataset")" "data-bin/$dataset" "$ckpt_dir" "$omega" "$seed" "$criterion"
  [ "$TRAIN_ONLY" = 0 ] || return 0
  supersede_if_retrained "$name" "$ckpt_dir/checkpoint_best.pt" "$kept" "$run_dir"
  if [ -f "$kept.jsonl" ] && [ -f "$kept.tsv" ] && ! keeps_neighbours "$criterion" "$seed"; then
    echo "$name is evaluated already ($kept.jsonl; delete it to evaluate again)"
    # training may have gone on without a new best checkpoint (a stricter stopping rule): its facts follow
    keep_training_facts "$dataset" "$criterion" "$omega" "$seed" "$ckpt_dir" "$kept"
    return 0
  fi
  ppl=$(train_ppl "$ckpt_dir/train.log")
  local labels="--label omega=$omega --label seed=$seed --label dataset=$dataset --label criterion=$criterion"
  if [ -n "$ppl" ]; then
    labels+=" --label train_ppl=$ppl"
  else
    echo "warning: no '| train |' ppl in $ckpt_dir/train.log; the table will show train ppl as missing" >&2
  fi
  # shellcheck disable=SC2046  # the settings are VAR=VALUE words without spaces
  run_pipeline "$ckpt_dir/checkpoint_best.pt" "data-bin/$dataset" "$run_dir" \
    KEY_TYPES=att METRICS=l2 EXACT_LIMIT=0 $(pipeline_settings) SCORE_ARGS="$labels"
  # committed as each model finishes: its result lines and one row of training facts
  mkdir -p "$OUT_DIR/models"
  cp "$run_dir/results.jsonl" "$kept.jsonl"
  keep_training_facts "$dataset" "$criterion" "$omega" "$seed" "$ckpt_dir" "$kept"
  if ! keeps_neighbours "$criterion" "$seed"; then
    rm -rf "$run_dir/cache/valid/knn" "$run_dir/cache/test/knn"
    echo "deleted the retrieved neighbours of $name (its lines are kept; KEEP_NEIGHBOURS=all keeps them)"
  fi
}

for dataset in "${DATASET_LIST[@]}"; do
  [ "$REPORT_ONLY" = 0 ] || break
  ensure_data "data-bin/$dataset" "$dataset" ${FROM:+--from "$FROM"}
  for model in "${TO_RUN[@]}"; do
    IFS=: read -r criterion omega seed <<< "$model"
    run_one "$dataset" "$criterion" "$omega" "$seed"
  done
done

if [ "$TRAIN_ONLY" = 1 ]; then
  echo "trained; nothing evaluated (--train-only): the same call without it evaluates what has stopped"
  exit 0
fi
step "report -> $OUT_DIR"
compgen -G "$OUT_DIR/models/*.jsonl" > /dev/null || die "no finished model in $OUT_DIR/models/ to report on"
printf 'dataset\tcriterion\tomega\tseed\ttrain_seconds\tbest_epoch\tbest_valid_ppl\ttrain_ppl\n' > "$OUT_DIR/training.tsv"
for lines in "$OUT_DIR"/models/*.jsonl; do  # one row of training facts per evaluated model
  if [ -f "${lines%.jsonl}.tsv" ]; then
    cat "${lines%.jsonl}.tsv" >> "$OUT_DIR/training.tsv"
  else
    echo "warning: no training facts (${lines%.jsonl}.tsv) beside $lines: training.tsv leaves that model out" >&2
  fi
done
cat "$OUT_DIR"/models/*.jsonl > "$OUT_DIR/results.jsonl"
knnlm report "$OUT_DIR/results.jsonl" --out "$OUT_DIR" --only ton2022_table,ton2022_figure1
echo "report: $OUT_DIR/report.md (table: $OUT_DIR/ton2022_table.md)"

analysis_dir() {  # dataset name: the folder of one analysis of the dataset's models
  if [ ${#DATASET_LIST[@]} -eq 1 ]; then echo "$OUT_DIR/$2"; else echo "$OUT_DIR/$2-$1"; fi
}

training_curves() {  # dataset: validation perplexity and key norm by epoch of its finished models
  local args=() tsv criterion omega label
  for tsv in "$OUT_DIR/models/$1".*.tsv; do
    [ -s "${tsv%.tsv}.log" ] || continue
    IFS=$'\t' read -r _ criterion omega _ < "$tsv"
    label="ω=$omega"
    [ "$criterion" = activation_l2 ] || label="$criterion ω=$omega"
    args+=(--log "${tsv%.tsv}.log" --label "$label")
  done
  [ ${#args[@]} -gt 0 ] || return 0
  step "training curves of $((${#args[@]} / 4)) models -> $(analysis_dir "$1" training)"
  knnlm analyze training "${args[@]}" --out "$(analysis_dir "$1" training)"
}

evaluated() {  # dataset name: true once the model's result lines are kept and its caches are on disk
  [ -f "$OUT_DIR/models/$1.$2.jsonl" ] && [ -d "runs/ton2022-$SCALE/$1/$2/cache/valid" ] \
    && [ -d "runs/ton2022-$SCALE/$1/$2/cache/test" ]
}

run_analyses() {  # dataset: the ω/τ question over the first seed's models; Figure 2 and clustering, ω = 0 vs 1
  local dataset=$1 seed=${FIRST_SEED:-1} model criterion omega s name n=0
  local runs=runs/ton2022-$SCALE/$1 ckpts=checkpoints/ton2022-$SCALE/$1
  TEMPERATURE_ARGS=()
  for model in "${MODELS[@]}"; do
    IFS=: read -r criterion omega s <<< "$model"
    [ "$criterion" = activation_l2 ] && [ "$s" = "$seed" ] || continue
    name=$(model_name "$criterion" "$omega" "$seed")
    if ! evaluated "$dataset" "$name"; then
      if [ "$omega" = 0 ]; then
        # each ω is compared with ω = 0, whose LM is the shared one: without it, an earlier analysis stays as it is
        echo "no ω/τ analysis: $name, the ω = 0 it compares with, has no kept result lines with caches on disk"
        return 0
      fi
      continue
    fi
    temperature_model_args "$runs/$name" "$ckpts/$name" "$omega"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || { echo "no evaluated seed-$seed model with its caches: no ω/τ analysis"; return 0; }
  if evaluated "$dataset" "w0-s$seed"; then shared_lm_args "$runs/w0-s$seed"; fi
  step "the ω/τ question over $n models -> $(analysis_dir "$dataset" temperature)"
  knnlm analyze temperature "${TEMPERATURE_ARGS[@]}" --data-bin "data-bin/$dataset" \
    --out "$(analysis_dir "$dataset" temperature)"
  evaluated "$dataset" "w0-s$seed" && evaluated "$dataset" "w1-s$seed" || return 0
  step "Figure 2 and the clustering analysis, ω = 0 vs ω = 1 -> $(analysis_dir "$dataset" analyses)"
  local pair=(--cache "$runs/w0-s$seed/cache/valid" --cache "$runs/w1-s$seed/cache/valid" --label 'ω=0' --label 'ω=1'
    --data-bin "data-bin/$dataset" --lambda 0.3 --out "$(analysis_dir "$dataset" analyses)")
  knnlm analyze frequency "${pair[@]}"
  knnlm analyze clustering "${pair[@]}"
}

for dataset in "${DATASET_LIST[@]}"; do
  training_curves "$dataset"
  run_analyses "$dataset"
done
