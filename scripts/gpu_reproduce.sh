#!/usr/bin/env bash
# The GPU route of the converged WikiText-2 reproduction (Ton et al. 2022, Table 1 and Figure 1; Xu et al.
# 2023, Table 1; the temperature analysis): the models of `scripts/ton2022.sh --scale small`, trained and
# evaluated on one GPU within a fixed time budget, on a machine without network. See usage below.
# The script runs its background jobs as fresh processes of itself (`--job`), so that each job's errors stop
# it as `set -e` intends (a subshell whose status is tested would ignore them).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/gpu_reproduce.sh OUT_DIR [--dry-run] [--from DIR]

The reproduction set of scripts/ton2022.sh --scale small on one GPU in under 9 minutes, for a
machine with Python 3.12, torch (CUDA), numpy and matplotlib but no network:

  install   the wheels of scripts/device_wheels.txt from .whl/ (pip --no-index --no-deps --target:
            the machine's python3 is itself a venv, whose packages a new venv would not see)
  train     all models at once, one fairseq-train process each on the one GPU: ω ∈ {0, 1} × seeds
            {1, 2, 3}, ω ∈ {0.1, 10} × seed 1, moco_queue ω = 1 × seed 1; the small recipe of
            scripts/lib.sh (knnlm_transformer_lm_small, same optimizer settings) in fp32, without
            --cpu; one epoch at a time until three epochs in a row each lower the best validation
            perplexity by less than 1% (`plateaued`, not before epoch 3), and no epoch past
            TRAIN_UNTIL: a model cut there is marked `time` in training.tsv and report.md
  evaluate  each model once trained: scripts/knnlm_pipeline.sh with SEARCH=exact DEVICE=cuda, att
            keys of all train tokens, full valid and test splits, exact L2 neighbours (k = 1024),
            λ = 0.25, 0.3 and tuned, τ = 1 and the sweep; cut at EVAL_UNTIL
  xu2023    Xu et al.'s Table 1 (att/ffn × L2/IP, exact) on the ω = 0, seed-1 model once it is
            trained, one combination at a time, as far as disk and EVAL_UNTIL allow
  analyze   knnlm analyze temperature over the seed-1 models of activation_l2 (valid and test
            caches, datastores, checkpoints); cut at ANALYSIS_UNTIL
  report    knnlm report --only ton2022_table,ton2022_figure1 and xu2023_table1; done by BUDGET

The CPU route (scripts/ton2022.sh, scripts/xu2023.sh) searches IVF2048,PQ32 indexes (FAISS mask and
score). This route searches exactly, with torch on the GPU (faiss-cpu has no GPU search; faiss's GPU
wheels need CUDA 12 and are too large to carry), so its lines have mask and score "real" and its
tables are rendered with --where mask_source=real --where score_source=real.

What must travel with the working tree (the device's `carry`): .whl (about 40 MB, fetched by
scripts/fetch_device_wheels.sh) and the data-bin, data-bin/wikitext-2 (5.8 MB; made here by
`knnlm prepare wikitext-2 --from ../shared/data/wikitext-2 --dest data-bin`, which is outside the
working tree); or, with --from DIR, a folder of the working tree holding wiki.{train,valid,test}.tokens
(13 MB), prepared on the machine.

Outputs (8 files at most) in OUT_DIR: results.jsonl, training.tsv, timings.tsv, temperature.json,
temperature.png, report.md, ton2022_figure1.png, run.log. Everything else goes to SCRATCH (deleted at
the end unless KEEP_SCRATCH=1); a rerun with SCRATCH kept reuses what is complete.

Options:
  --dry-run   print the plan and check the wheels and the data: exit 0 when all are there, 2 when
              not; runs anywhere in seconds and writes nothing
  --from DIR  a raw WikiText-2 folder to prepare when DATA is absent
  -h, --help  this text

Environment: DATA (data-bin/wikitext-2), WHEELS (.whl), PYTHON (python3), SCRATCH
(/tmp/knnlm-gpu-reproduce), DEVICE (cuda; cpu for a trial), MODELS ("criterion:ω:seed ..."), XU (1;
0 leaves Xu's Table 1 out), seconds from the start: TRAIN_UNTIL (300), EVAL_UNTIL (460),
ANALYSIS_UNTIL (505), BUDGET (530); TAU_POINTS (21, the analysis' τ grid), EVAL_DISK_GB (8) and
XU_DISK_GB (8): free disk each evaluation waits for; EPOCHS, MIN_GAIN, PATIENCE, MIN_EPOCHS (scripts/lib.sh);
K_MAX, EVAL_LIMIT, TEMPERATURES (scripts/knnlm_pipeline.sh).
EOF
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)

DATA=${DATA:-data-bin/wikitext-2}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
SCRATCH=${SCRATCH:-/tmp/knnlm-gpu-reproduce}
DEVICE=${DEVICE:-cuda}
XU=${XU:-1}
TRAIN_UNTIL=${TRAIN_UNTIL:-300} EVAL_UNTIL=${EVAL_UNTIL:-460} ANALYSIS_UNTIL=${ANALYSIS_UNTIL:-505}
BUDGET=${BUDGET:-530}
TAU_POINTS=${TAU_POINTS:-21}
EVAL_DISK_GB=${EVAL_DISK_GB:-8} XU_DISK_GB=${XU_DISK_GB:-8} MIN_FREE_GB=${MIN_FREE_GB:-2}
# the models of scripts/ton2022.sh --scale small, as criterion:ω:seed
MODELS=${MODELS:-"activation_l2:0:1 activation_l2:1:1 activation_l2:0:2 activation_l2:1:2 activation_l2:0:3
  activation_l2:1:3 activation_l2:0.1:1 activation_l2:10:1 moco_queue:1:1"}
read -r -a MODEL_LIST <<< "${MODELS//$'\n'/ }"
XU_BASE=activation_l2:0:1
OUTPUTS=(results.jsonl training.tsv timings.tsv temperature.json temperature.png report.md ton2022_figure1.png
  run.log)
STATE=$SCRATCH/state

is_temperature_model() {  # criterion omega seed: the analysis compares the seed-1 models of every ω
  [ "$1" = activation_l2 ] && [ "$3" = 1 ]
}

elapsed() { echo $(($(date +%s) - T0)); }

say() {  # message: a progress line in run.log, stamped with the seconds since the start
  printf '[%3ds] %s\n' "$(elapsed)" "$*" >&3
}

run_until() {  # seconds-from-start command...: the command, killed (with its children) at that time
  local left=$((T0 + $1 - $(date +%s)))
  shift
  [ "$left" -gt 0 ] || return 124
  timeout --kill-after=5 "$left" "$@"
}

pipeline() {  # checkpoint out [VAR=VALUE...]: scripts/knnlm_pipeline.sh through lib.sh, cut at EVAL_UNTIL
  local ckpt=$1 out=$2
  shift 2
  # shellcheck disable=SC2016  # expanded by the inner bash
  run_until "$EVAL_UNTIL" bash -c 'source scripts/lib.sh; run_pipeline "$@"' _ "$ckpt" "$DATA" "$out" \
    SEARCH=exact DEVICE="$DEVICE" TPS=256 CW=128 EXACT_LIMIT=0 "$@"
}

reserve_disk() {  # name gigabytes: wait (until EVAL_UNTIL) for that much free disk beyond what others reserved
  local name=$1 need=$2 avail reserved
  while [ "$(elapsed)" -lt "$EVAL_UNTIL" ]; do
    if mkdir "$STATE/disk.lock" 2> /dev/null; then
      avail=$(df -Pk "$SCRATCH" | awk 'NR == 2 {print int($4 / 1048576)}')
      reserved=$(cat "$STATE"/*.disk 2> /dev/null | awk '{s += $1} END {print s + 0}')
      if [ $((avail - reserved - need)) -ge "$MIN_FREE_GB" ]; then
        echo "$need" > "$STATE/$name.disk"
        rmdir "$STATE/disk.lock"
        return 0
      fi
      rmdir "$STATE/disk.lock"
    fi
    sleep 2
  done
  return 1
}

wait_for() {  # seconds-from-start all|any file...: wait until all (any) of the files exist; false if time ran out
  local until=$1 mode=$2 f found
  shift 2
  while [ "$(elapsed)" -lt "$until" ]; do
    found=0
    for f in "$@"; do if [ -e "$f" ]; then found=$((found + 1)); fi; done
    if [ "$found" = $# ] || { [ "$mode" = any ] && [ "$found" -gt 0 ]; }; then return 0; fi
    sleep 2
  done
  return 1
}

# --- the jobs (each a process of its own: scripts/gpu_reproduce.sh --job KIND ...) ------------------

job_model() {  # criterion omega seed: train, write its training row, evaluate, keep its lines
  local criterion=$1 omega=$2 seed=$3 name ckpt run best epochs stop labels ppl t0
  name=$(model_name "$criterion" "$omega" "$seed")
  ckpt=$SCRATCH/checkpoints/$name run=$SCRATCH/runs/$name
  t0=$(elapsed)
  TRAIN_DEVICE=$DEVICE TRAIN_DEADLINE=$((T0 + TRAIN_UNTIL)) train_lm small "$DATA" "$ckpt" "$omega" "$seed" "$criterion"
  best=$(best_valid "$ckpt/train.log")
  epochs=$(valid_ppls "$ckpt/train.log" | tail -n 1 | cut -d ' ' -f 1)
  stop=$(cat "$ckpt/train.stop" 2> /dev/null || echo reused)
  ppl=$(train_ppl "$ckpt/train.log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$DATA")" "$criterion" "$omega" "$seed" \
    "$(train_seconds "$ckpt")" "${best% *}" "${best#* }" "${ppl:-}" "$epochs" "$stop" > "$STATE/$name.tsv"
  printf '%s\ttrain\t%s\t%s\n' "$name" "$t0" $(($(elapsed) - t0)) >> "$STATE/$name.timings"
  touch "$STATE/$name.trained"
  say "$name: trained $epochs epochs (stopped by: $stop), best valid ppl ${best#* } at epoch ${best% *}"

  reserve_disk "$name" "$EVAL_DISK_GB" || { say "$name: not evaluated (no disk free before EVAL_UNTIL)"; exit 1; }
  t0=$(elapsed)
  labels="--label omega=$omega --label seed=$seed --label dataset=$(basename "$DATA") --label criterion=$criterion"
  labels+=${ppl:+ --label train_ppl=$ppl}
  pipeline "$ckpt/checkpoint_best.pt" "$run" KEY_TYPES=att METRICS=l2 SCORE_ARGS="$labels" \
    || { say "$name: evaluation failed or cut at EVAL_UNTIL (log: $name.log)"; exit 1; }
  rm -f "$STATE/$name.disk"
  cp "$run/results.jsonl" "$STATE/$name.jsonl"
  printf '%s\tevaluate\t%s\t%s\n' "$name" "$t0" $(($(elapsed) - t0)) >> "$STATE/$name.timings"
  awk -F '\t' -v OFS='\t' -v n="$name" 'NR > 1 {print n, $1, "", $2}' "$run/timings.tsv" >> "$STATE/$name.timings"
  touch "$STATE/$name.evaluated"
  say "$name: evaluated ($(grep -c . "$run/results.jsonl") result lines)"
  # the analysis reads the datastores and neighbours of the seed-1 models; the others' go now
  if ! is_temperature_model "$criterion" "$omega" "$seed"; then rm -rf "$run/datastore" "$run/cache"; fi
}

job_xu2023() {  # Xu et al.'s Table 1 on the ω = 0, seed-1 model: one key type and similarity at a time
  local criterion omega seed name ckpt run kt m t0
  IFS=: read -r criterion omega seed <<< "$XU_BASE"
  name=$(model_name "$criterion" "$omega" "$seed")
  ckpt=$SCRATCH/checkpoints/$name run=$SCRATCH/runs/xu2023
  wait_for "$EVAL_UNTIL" any "$STATE/$name.trained" "$STATE/$name.ended" || true
  [ -e "$STATE/$name.trained" ] || { say "xu2023: $name was not trained in time; Table 1 left out"; exit 1; }
  t0=$(elapsed)
  : > "$STATE/xu2023.part"
  # one combination at a time, its caches deleted once scored (a cache lists its retrievals, so it goes whole
  # and the next combination dumps again): 8 GB of disk at a time instead of 26
  for kt in att ffn; do
    for m in l2 ip; do
      reserve_disk xu2023 "$XU_DISK_GB" || { say "xu2023: no disk free before EVAL_UNTIL"; exit 1; }
      pipeline "$ckpt/checkpoint_best.pt" "$run" KEY_TYPES=$kt METRICS=$m TEMPERATURES=none \
        SCORE_ARGS="--label dataset=$(basename "$DATA") --label run=xu2023" \
        || { say "xu2023: $kt/$m failed or cut at EVAL_UNTIL"; exit 1; }
      rm -f "$STATE/xu2023.disk"
      cat "$run/results.jsonl" >> "$STATE/xu2023.part"
      rm -rf "$run/cache"
      say "xu2023: $kt/$m scored"
    done
    rm -rf "$run/datastore/$kt"
  done
  mv "$STATE/xu2023.part" "$STATE/xu2023.jsonl"
  printf 'xu2023\tevaluate\t%s\t%s\n' "$t0" $(($(elapsed) - t0)) >> "$STATE/xu2023.timings"
  awk -F '\t' -v OFS='\t' 'NR > 1 {print "xu2023", $1, "", $2}' "$run/timings.tsv" >> "$STATE/xu2023.timings"
}

job_temperature() {  # knnlm analyze temperature over the seed-1 models evaluated in time
  local model criterion omega seed name ended=() t0
  for model in "${MODEL_LIST[@]}"; do
    IFS=: read -r criterion omega seed <<< "$model"
    if is_temperature_model "$criterion" "$omega" "$seed"; then
      ended+=("$STATE/$(model_name "$criterion" "$omega" "$seed").ended")
    fi
  done
  wait_for "$ANALYSIS_UNTIL" all "${ended[@]}" || true
  TEMPERATURE_ARGS=()
  for model in "${MODEL_LIST[@]}"; do
    IFS=: read -r criterion omega seed <<< "$model"
    name=$(model_name "$criterion" "$omega" "$seed")
    [ -e "$STATE/$name.evaluated" ] || continue
    is_temperature_model "$criterion" "$omega" "$seed" || continue
    temperature_model_args "$SCRATCH/runs/$name" "$SCRATCH/checkpoints/$name" "$omega"
    [ "$omega" != 0 ] || shared_lm_args "$SCRATCH/runs/$name"
  done
  [ ${#TEMPERATURE_ARGS[@]} -gt 0 ] || { say "temperature: no seed-1 model was evaluated in time"; exit 1; }
  t0=$(elapsed)
  say "temperature: knnlm analyze temperature over $(grep -c -- '^--label$' < <(printf '%s\n' "${TEMPERATURE_ARGS[@]}")) models"
  run_until "$ANALYSIS_UNTIL" knnlm analyze temperature "${TEMPERATURE_ARGS[@]}" --mask-source real --score-source real \
    --k "${K_MAX:-1024}" --tau-points "$TAU_POINTS" --data-bin "$DATA" --out "$SCRATCH/temperature" \
    || { say "temperature: failed or cut at ANALYSIS_UNTIL"; exit 1; }
  printf 'temperature\tanalyze\t%s\t%s\n' "$t0" $(($(elapsed) - t0)) >> "$STATE/temperature.timings"
  say "temperature: done"
}

if [ "${1:-}" = --job ]; then  # fd 3 (run.log) comes from the main process
  cd "$ROOT"
  kind=$2
  shift 2
  "job_$kind" "$@"
  exit 0
fi

# --- the command line, the plan and the checks ----------------------------------------------------

OUT_DIR='' DRY=0 FROM=''
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1; shift ;;
    --from) need_value "$1" $#; FROM=$(abspath "$2"); shift 2 ;;
    -*) usage_error "unknown option '$1'" ;;
    *) [ -z "$OUT_DIR" ] || usage_error "one OUT_DIR only"; OUT_DIR=$(abspath "$1"); shift ;;
  esac
done
[ -n "$OUT_DIR" ] || usage_error "OUT_DIR is required"
cd "$ROOT"  # DATA, WHEELS and SCRATCH are relative to the repository root
[ "$DEVICE" = cuda ] || [ "$DEVICE" = cpu ] || usage_error "DEVICE must be cuda or cpu, not '$DEVICE'"
for model in "${MODEL_LIST[@]}"; do
  [[ $model =~ ^(activation_l2|moco_queue):[0-9]+([.][0-9]+)?:[0-9]+$ ]] \
    || usage_error "a model is criterion:ω:seed (criterion activation_l2 or moco_queue), not '$model'"
done
[ $((TRAIN_UNTIL < EVAL_UNTIL && EVAL_UNTIL <= ANALYSIS_UNTIL && ANALYSIS_UNTIL < BUDGET)) = 1 ] \
  || usage_error "the budgets must satisfy TRAIN_UNTIL < EVAL_UNTIL <= ANALYSIS_UNTIL < BUDGET"

missing=0
check_data() {  # the data-bin, or the raw text of --from that will be prepared into it; missing=1 if neither
  local f tokens
  if [ -f "$DATA/meta.json" ]; then
    for f in dict.txt train.bin train.idx valid.bin valid.idx test.bin test.idx; do
      [ -f "$DATA/$f" ] || { echo "data   $DATA/$f: MISSING"; missing=1; }
    done
    tokens=$(grep -o '"tokens": [0-9]*' "$DATA/meta.json" | head -n 1 | tr -d '"')
    echo "data   $DATA: $tokens (train), $(du -sh "$DATA" | cut -f 1)"
  elif [ -n "$FROM" ]; then
    for f in wiki.train.tokens wiki.valid.tokens wiki.test.tokens; do
      [ -f "$FROM/$f" ] || { echo "data   $FROM/$f: MISSING"; missing=1; }
    done
    echo "data   $DATA: absent; prepared from $FROM (knnlm prepare wikitext-2 --from $FROM)"
  else
    echo "data   $DATA: MISSING (make it with \`knnlm prepare wikitext-2 --from DIR --dest $(dirname "$DATA")\`"
    echo "       and carry it, or give --from DIR with WikiText-2's raw wiki.*.tokens inside the working tree)"
    missing=1
  fi
}

print_plan() {  # the models, the phases with their time budgets (estimates in brackets), the outputs
  local model criterion omega seed name roles
  for model in "${MODEL_LIST[@]}"; do
    IFS=: read -r criterion omega seed <<< "$model"
    name=$(model_name "$criterion" "$omega" "$seed") roles=''
    if is_temperature_model "$criterion" "$omega" "$seed"; then roles=' [temperature analysis]'; fi
    if [ "$XU" = 1 ] && [ "$model" = "$XU_BASE" ]; then roles+=' [xu2023 Table 1]'; fi
    printf 'model  %-12s %s ω=%s seed %s%s\n' "$name" "$criterion" "$omega" "$seed" "$roles"
  done
  # [~N s]: estimates for one H200 (docs/results.md, "GPU route"); the times before them are hard limits
  printf 'phase  %-9s %s\n' \
    install "from 0 s: pip install --no-index --no-deps --target $SCRATCH/site, ${#WHEEL_FILES[@]} wheels [~30 s]" \
    train "until ${TRAIN_UNTIL} s: ${#MODEL_LIST[@]} fairseq-train processes at once, one epoch a call [~20 s each]" \
    evaluate "each model once trained, until ${EVAL_UNTIL} s: knnlm_pipeline.sh SEARCH=exact, att/L2 [~2 min a model]" \
    xu2023 "$([ "$XU" = 1 ] || echo 'off (XU=0); ')once w0-s1 is trained, until ${EVAL_UNTIL} s: att/ffn × L2/IP" \
    analyze "once the seed-1 models are evaluated, until ${ANALYSIS_UNTIL} s: $TAU_POINTS τ points [~40 s]" \
    report "until ${BUDGET} s: ton2022_table,ton2022_figure1, xu2023_table1 [~15 s]"
  for f in "${OUTPUTS[@]}"; do echo "output $OUT_DIR/$f"; done
}

find_device_wheels "$WHEELS"
[ "$MISSING_WHEELS" = 0 ] || missing=1
check_data
print_plan
if [ "$DRY" = 1 ]; then
  if [ "$missing" = 0 ]; then echo "dry run: every wheel and the data are present"; exit 0; fi
  echo "dry run: something is missing (see above)"
  exit 2
fi
[ "$missing" = 0 ] || { echo "$(basename "$0"): wheels or data missing; see above" >&2; exit 2; }

# --- the run -----------------------------------------------------------------------------------------

T0=$(date +%s)
SCRATCH=$(abspath "$SCRATCH") DATA=$(abspath "$DATA")
mkdir -p "$OUT_DIR" "$SCRATCH"
rm -rf "$STATE" "$SCRATCH/temperature" "$SCRATCH/logs" "$SCRATCH/run.log"
mkdir -p "$STATE" "$SCRATCH/logs"
print_plan > "$SCRATCH/run.log"
exec 3> >(tee -a "$SCRATCH/run.log")
export T0 DATA SCRATCH DEVICE XU TRAIN_UNTIL EVAL_UNTIL ANALYSIS_UNTIL BUDGET TAU_POINTS EVAL_DISK_GB XU_DISK_GB
export MIN_FREE_GB MODELS OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
say "gpu_reproduce.sh: scratch $SCRATCH ($(df -Ph "$SCRATCH" | awk 'NR == 2 {print $4 " free"}')), out $OUT_DIR"

install() {  # the carried wheels into $SCRATCH/site unless importable already; knnlm and fairseq-train as commands
  local py t0
  t0=$(elapsed)
  py=$(command -v "$PYTHON")
  export PYTHONPATH="$PWD:$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$SCRATCH/bin:$PATH"
  if "$py" -c 'import fairseq, faiss, hydra, omegaconf, bitarray' 2> /dev/null; then
    say "install: the packages are importable already"
  else
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SCRATCH/site" \
      "${WHEEL_FILES[@]}"
    say "install: ${#WHEEL_FILES[@]} wheels into $SCRATCH/site"
  fi
  # a package that does not import with the machine's torch fails here, not in nine jobs at once
  "$py" -c 'import faiss, fairseq_cli.train, knnlm.cli.main' > /dev/null
  mkdir -p "$SCRATCH/bin"
  printf '#!/bin/sh\nexec %s -m knnlm.cli.main "$@"\n' "$py" > "$SCRATCH/bin/knnlm"
  printf '#!/bin/sh\nexec %s -m fairseq_cli.train "$@"\n' "$py" > "$SCRATCH/bin/fairseq-train"
  chmod +x "$SCRATCH/bin/knnlm" "$SCRATCH/bin/fairseq-train"
  "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.is_available())' >&3
  if [ "$DEVICE" = cuda ]; then
    "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no GPU")'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&3 2> /dev/null || true
  fi
  printf 'main\tinstall\t%s\t%s\n' "$t0" $(($(elapsed) - t0)) >> "$STATE/main.timings"
}

JOBS=()
start_job() {  # name kind args...: scripts/gpu_reproduce.sh --job kind args in the background; NAME.ended when over
  local name=$1 status=0
  shift
  { bash "$0" --job "$@" > "$SCRATCH/logs/$name.log" 2>&1 || status=$?; echo "$status" > "$STATE/$name.ended"; } &
  JOBS+=($!)
}

install
if [ ! -f "$DATA/meta.json" ]; then
  ensure_data "$DATA" wikitext-2 --from "$FROM" > "$SCRATCH/logs/prepare.log" 2>&1
  say "prepare: $DATA from $FROM"
fi
for model in "${MODEL_LIST[@]}"; do
  IFS=: read -r criterion omega seed <<< "$model"
  start_job "$(model_name "$criterion" "$omega" "$seed")" model "$criterion" "$omega" "$seed"
done
if [ "$XU" = 1 ] && [[ " ${MODEL_LIST[*]} " == *" $XU_BASE "* ]]; then start_job xu2023 xu2023; fi
start_job temperature temperature
say "started ${#MODEL_LIST[@]} model jobs$([ "$XU" = 1 ] && echo ', xu2023') and the temperature analysis"
wait "${JOBS[@]}"  # not a bare wait: that would wait for run.log's tee too

# --- the outputs -------------------------------------------------------------------------------------

t0=$(elapsed)
printf 'dataset\tcriterion\tomega\tseed\ttrain_seconds\tbest_epoch\tbest_valid_ppl\ttrain_ppl\tepochs\tstopped_by\n' \
  > "$OUT_DIR/training.tsv"
models_jsonl=$SCRATCH/models.jsonl
: > "$models_jsonl"
for model in "${MODEL_LIST[@]}"; do
  IFS=: read -r criterion omega seed <<< "$model"
  name=$(model_name "$criterion" "$omega" "$seed")
  if [ -f "$STATE/$name.tsv" ]; then cat "$STATE/$name.tsv" >> "$OUT_DIR/training.tsv"; fi
  if [ -f "$STATE/$name.jsonl" ]; then cat "$STATE/$name.jsonl" >> "$models_jsonl"; fi
done
cat "$models_jsonl" > "$OUT_DIR/results.jsonl"
[ ! -f "$STATE/xu2023.jsonl" ] || cat "$STATE/xu2023.jsonl" >> "$OUT_DIR/results.jsonl"
for f in temperature.json temperature.png; do
  [ ! -f "$SCRATCH/temperature/$f" ] || cp "$SCRATCH/temperature/$f" "$OUT_DIR/$f"
done

report_body() {  # jsonl out-dir parts: knnlm report's markdown of those parts (exact search: mask and score real)
  [ -s "$1" ] || { echo "(no result lines)"; return 0; }
  run_until "$BUDGET" knnlm report "$1" --out "$2" --only "$3" --where mask_source=real --where score_source=real \
    --where labels.cache=full --where k="${K_MAX:-1024}" > /dev/null 2>> "$SCRATCH/logs/report.log" || { echo "(knnlm report failed)"; return 0; }
  tail -n +4 "$2/report.md" | sed 's/(ton2022_figure1_[^)]*[.]png)/(ton2022_figure1.png)/'
}

{
  echo "# WikiText-2 reproduction, GPU route (scripts/gpu_reproduce.sh)"
  echo
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1 || true)
  echo "$(date -u +%Y-%m-%d), device $DEVICE${gpu:+ ($gpu)}; budgets from the start: training ${TRAIN_UNTIL} s,"
  echo "evaluation ${EVAL_UNTIL} s, analysis ${ANALYSIS_UNTIL} s, all ${BUDGET} s."
  echo
  echo "Differences from the CPU route: the same recipe and stopping rule, trained on $DEVICE in fp32 but cut"
  echo "at ${TRAIN_UNTIL} s (\`stopped_by\` = time: not converged); **exact neighbours** (torch top-k over every"
  echo "training token, mask and score \"real\") where the CPU route searches IVF2048,PQ32 indexes (nprobe 32)."
  echo
  echo "## Training"
  echo
  awk -F '\t' '{row = "|"; rule = "|"; for (i = 1; i <= NF; i++) {row = row " " $i " |"; rule = rule "---|"}
    print row} NR == 1 {print rule}' "$OUT_DIR/training.tsv"
  echo
  echo "## Ton et al. (2022), Table 1 and Figure 1"
  echo
  report_body "$models_jsonl" "$SCRATCH/report" ton2022_table,ton2022_figure1
  echo
  echo "## Xu et al. (2023), Table 1 (ω = 0, seed 1)"
  echo
  if [ -f "$STATE/xu2023.jsonl" ]; then report_body "$STATE/xu2023.jsonl" "$SCRATCH/report-xu" xu2023_table1
  else echo "Not run or not finished in time (see run.log)."; fi
  echo
  echo "## Temperature analysis (knnlm analyze temperature)"
  echo
  if [ -f "$OUT_DIR/temperature.json" ]; then
    grep -h 'mean‖q‖²' "$SCRATCH/logs/temperature.log" | sed 's/^.*INFO[^:]*: //; s/^/- /' || true
    echo
    echo "Validation perplexity, λ tuned at each τ; the test perplexities and the norms: temperature.json; the"
    echo "curves: temperature.png."
  else echo "Not finished in time (see run.log)."; fi
} > "$OUT_DIR/report.md"
figure=$(compgen -G "$SCRATCH/report/ton2022_figure1*.png" | head -n 1 || true)
[ -z "$figure" ] || cp "$figure" "$OUT_DIR/ton2022_figure1.png"
printf 'main\treport\t%s\t%s\n' "$t0" $(($(elapsed) - t0)) >> "$STATE/main.timings"

{
  printf 'job\tstep\tstart_s\tseconds\n'
  cat "$STATE"/*.timings 2> /dev/null || true
} > "$OUT_DIR/timings.tsv"
for log in "$SCRATCH"/logs/*.log; do
  [ "$(cat "$STATE/$(basename "$log" .log).ended" 2> /dev/null || echo 0)" = 0 ] && continue
  { echo "--- the end of $(basename "$log") (the job failed)"; tail -n 15 "$log"; } >&3
done
say "done: $(grep -c . "$OUT_DIR/results.jsonl") result lines, $(($(wc -l < "$OUT_DIR/training.tsv") - 1)) trained" \
  "models; $OUT_DIR"
exec 3>&-
sleep 1  # tee's last lines
cp "$SCRATCH/run.log" "$OUT_DIR/run.log"
[ "${KEEP_SCRATCH:-0}" = 1 ] || rm -rf "$SCRATCH"
