#!/usr/bin/env bash
# Xu, Alon & Neubig (2023), Section 4 and Appendices C/E: trainable replacements of the datastore on a
# frozen base LM (learned nV x D W_ds, adaptive sizes, mixture of softmaxes, clustered datastore) and the
# Appendix E experiments (interpolated loss, distillation, top-k sparsified LM, second-seed ensemble,
# overfitted continuation). Every variant becomes a component of the base LM's valid/test caches and is
# scored like kNN-LM (λ tuned on validation): `knnlm report` renders xu2023_table2, 5-9, figure3, figure8.
# Finished steps are reused, so an interrupted run can simply be restarted.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: scripts/xu2023_replacements.sh --scale small|paper --pipeline DIR [options]

Needs the output folder of `scripts/xu2023.sh` / `scripts/knnlm_pipeline.sh` for the same base LM
(--pipeline DIR: DIR/cache/{valid,test} with att and ffn queries, DIR/datastore/{att,ffn}).

Options:
  --scale small|paper     training of every head (small: on CPU, batches of MAX_TOKENS=2048 tokens,
                          LR=0.003, validated every VALID_UPDATES=250 updates and stopped once
                          HEAD_PATIENCE=3 validations in a row bring no lower validation loss (fairseq's
                          --patience), at most MAX_UPDATES=4000 updates (about 4 epochs); paper: EPOCHS=3
                          passes over the training set on a GPU, validated after each). Each head is
                          evaluated from its checkpoint_best.pt (lowest validation loss); <out>/heads.tsv
                          records its updates, epochs, best update, best valid ppl and what stopped it.
  --pipeline DIR          the base LM's pipeline folder (caches and datastores)
  --checkpoint CKPT       the frozen base LM (the checkpoint DIR's caches were dumped from)
  --data DIR              its data-bin
  --out DIR               report folder (default results/xu2023-replacements-<scale>)
  -h, --help              this text

Environment (lists are space separated):
  EXPERIMENTS   which parts, default "learned adaptive mos clusters appendix_e"
  KEYS          h_ds of the learned W_ds, default "att ffn";  NS  n of nV x D, default "1 2 3 6"
  ADAPTIVE_N    total rows / V of the adaptive sizes, default 3 (by frequency and by loss, on att)
  MOS_RS        mixture components, default "2 3" (on att and ffn, W_sm frozen and fine-tuned)
  CLUSTER_C     centroids per word (cV), default 1; CLUSTER_TRAIN_SIZE keys for k-means, default 500000
  TOPK_KS       top-k sparsification k, default "1 2 4 8 16 32 64 128 256 512 1024 33280"; TOPK_TEMPS default "1 2 3"
  APPENDIX_E    parts of appendix_e, default "interpolated distill topk ensemble overfit"
  SEED2_CKPT    a second LM trained from another seed (needed by the ensemble part)
  OVERFIT_UPDATES  continue the base LM without dropout for this many updates (default: small 500, paper 20000)
  MAX_TOKENS, LR, VALID_UPDATES, HEAD_PATIENCE, MAX_UPDATES, EPOCHS   the heads' training (see --scale)
EOF_USAGE
}

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

SCALE='' PIPELINE='' CHECKPOINT='' DATA='' OUT_DIR=''
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --scale) need_value "$1" $#; SCALE=$2; shift 2 ;;
    --pipeline) need_value "$1" $#; PIPELINE=$(abspath "$2"); shift 2 ;;
    --checkpoint) need_value "$1" $#; CHECKPOINT=$(abspath "$2"); shift 2 ;;
    --data) need_value "$1" $#; DATA=$(abspath "$2"); shift 2 ;;
    --out) need_value "$1" $#; OUT_DIR=$(abspath "$2"); shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
case $SCALE in
  small | paper) ;;
  '') usage_error "--scale small|paper is required" ;;
  *) usage_error "--scale must be small or paper, not '$SCALE'" ;;
esac
[ -n "$PIPELINE" ] || usage_error "--pipeline DIR is required (the output of scripts/xu2023.sh for the base LM)"
[ -n "$CHECKPOINT" ] && [ -n "$DATA" ] || usage_error "--checkpoint and --data (the frozen base LM) are required"
for split in valid test; do
  [ -f "$PIPELINE/cache/$split/meta.json" ] || die "no cache $PIPELINE/cache/$split: run scripts/xu2023.sh first"
done
[ -f "$CHECKPOINT" ] || die "no checkpoint $CHECKPOINT"
require_commands knnlm fairseq-train
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-$PWD/results/xu2023-replacements-$SCALE}
RUN_DIR=$PWD/runs/xu2023-replacements-$SCALE
RESULTS=$RUN_DIR/results.jsonl
mkdir -p "$RUN_DIR" "$OUT_DIR"
EXPERIMENTS=${EXPERIMENTS:-learned adaptive mos clusters appendix_e}
KEYS=${KEYS:-att ffn}
NS=${NS:-1 2 3 6}

if [ "$SCALE" = small ]; then
  # until the validation loss stops improving; a checkpoint (checkpoint_best.pt if it is the best) at each validation
  VALID_UPDATES=${VALID_UPDATES:-250}
  BUDGET=(--max-tokens "${MAX_TOKENS:-2048}" --validate-interval-updates "$VALID_UPDATES"
    --save-interval-updates "$VALID_UPDATES" --keep-interval-updates 1 --patience "${HEAD_PATIENCE:-3}"
    --max-update "${MAX_UPDATES:-4000}" --cpu)
  LR=${LR:-0.003}
  OVERFIT_UPDATES=${OVERFIT_UPDATES:-500}
else
  BUDGET=(--max-epoch "${EPOCHS:-3}" --max-tokens "${MAX_TOKENS:-3072}" --fp16)
  LR=${LR:-0.001}
  OVERFIT_UPDATES=${OVERFIT_UPDATES:-20000}
fi
TPS=$(json_field "$PIPELINE/cache/valid/meta.json" dump context tokens_per_sample)
[ -n "$TPS" ] || die "$PIPELINE/cache/valid/meta.json has no dump.context.tokens_per_sample (dump the cache again)"

train_head() {  # name [fairseq-train options...]: one frozen-base head, trained once
  local name=$1 dir=$RUN_DIR/heads/$1
  shift
  if [ -f "$dir/train.done" ]; then echo "reusing $dir"; return 0; fi
  mkdir -p "$dir"
  step "train head $name -> $dir (log: $dir/train.log)"
  fairseq-train "$DATA" --user-dir "$PWD/knnlm" --task language_modeling --sample-break-mode none \
    --tokens-per-sample "$TPS" --arch knnlm_ds_replacement --base-checkpoint "$CHECKPOINT" \
    --criterion ds_replacement --optimizer adam --adam-betas '(0.9,0.98)' --lr "$LR" --seed 1 \
    --num-workers 0 --save-dir "$dir" --no-epoch-checkpoints --no-save-optimizer-state \
    --log-format simple --log-interval 10 "${BUDGET[@]}" "$@" >> "$dir/train.log" 2>&1 \
    || { tail -n 20 "$dir/train.log" >&2; die "fairseq-train failed; see $dir/train.log"; }
  [ -f "$dir/checkpoint_best.pt" ] || die "no $dir/checkpoint_best.pt after training (validation disabled?)"
  touch "$dir/train.done"
  head_facts "$name" | awk -F '\t' '{print "trained " $2 " updates (" $3 " epochs); best valid ppl " $5 \
    " at update " $4 "; stopped by " $6}'
}

head_checkpoint() {  # name: the head's best checkpoint (last for a head trained without validation)
  local dir=$RUN_DIR/heads/$1
  if [ -f "$dir/checkpoint_best.pt" ]; then echo "$dir/checkpoint_best.pt"; else echo "$dir/checkpoint_last.pt"; fi
}

head_facts() {  # name: its heads.tsv row (updates, epochs, best update, best valid ppl, stopped by) from train.log
  local log=$RUN_DIR/heads/$1/train.log stop=cap
  if grep -q 'early stop' "$log"; then stop=patience; fi
  { grep -F '| valid |' "$log" || true; } | awk -F ' [|] ' -v OFS='\t' -v name="$1" -v stop="$stop" '
    { for (i = 1; i <= NF; i++) { split($i, kv, " "); v[kv[1]] = kv[2] }
      if (v["num_updates"] + 0 > updates) { updates = v["num_updates"] + 0; epochs = v["epoch"] + 0 }
      # the update checkpoint_best.pt holds: fairseq replaces it at a loss <= the best so far
      if (best == "" || v["loss"] + 0 <= best) { best = v["loss"] + 0; best_update = v["num_updates"] + 0
                                                 ppl = v["ppl"] } }
    END { if (NR == 0) stop = "no validation"; print name, updates, epochs, best_update, ppl, stop }'
}

add_component() {  # name [knnlm eval component source options...]: into both caches, once
  local name=$1 split
  shift
  for split in valid test; do
    if [ -f "$PIPELINE/cache/$split/components/$name/meta.json" ]; then continue; fi
    knnlm eval component --cache "$PIPELINE/cache/$split" --name "$name" "$@"
  done
  SCORED+=("$name")
}

add_lm_cache() {  # name checkpoint: dump another LM over the same tokens, then add it as a component
  local name=$1 ckpt=$2 split limit
  for split in valid test; do
    limit=$(dump_limit "$PIPELINE/cache/$split")
    if [ ! -f "$RUN_DIR/lm-caches/$name/$split/meta.json" ]; then
      knnlm eval dump --checkpoint "$ckpt" --data "$DATA" --split "$split" --out "$RUN_DIR/lm-caches/$name/$split" \
        --tokens-per-sample "$TPS" --context-window "$((TPS / 2))" ${limit:+--limit-tokens "$limit"}
    fi
  done
  for split in valid test; do
    if [ ! -f "$PIPELINE/cache/$split/components/$name/meta.json" ]; then
      knnlm eval component --cache "$PIPELINE/cache/$split" --name "$name" --lm-cache "$RUN_DIR/lm-caches/$name/$split"
    fi
  done
  SCORED+=("$name")
}

checkpoint_arch() {  # checkpoint: the --arch it was trained with (for continuing it)
  python -c "import sys, torch; s = torch.load(sys.argv[1], map_location='cpu', weights_only=False); \
print(s['cfg']['model']['_name'] if s.get('cfg') else s['args'].arch)" "$1"
}

SCORED=()
FFN_STORE=$PIPELINE/datastore/ffn
ATT_STORE=$PIPELINE/datastore/att
for part in $EXPERIMENTS; do
  case $part in
    learned)  # Table 2, Table 5, Figure 3
      for key in $KEYS; do
        for n in $NS; do
          train_head "$key-n$n" --ds-key "$key" --ds-n "$n"
          add_component "learned-$key-n$n" --checkpoint "$(head_checkpoint "$key-n$n")" --data "$DATA"
        done
      done ;;
    adaptive)  # Table 6
      n=${ADAPTIVE_N:-3}
      for by in frequency loss; do
        sizes=$RUN_DIR/sizes/$by-n$n.npy
        [ -f "$sizes" ] || knnlm replace sizes --datastore "$FFN_STORE" --by "$by" --n "$n" --out "$sizes" \
          --checkpoint "$CHECKPOINT" --data "$DATA"
        train_head "att-$by-n$n" --ds-key att --ds-sizes "$sizes"
        add_component "adaptive-att-$by-n$n" --checkpoint "$(head_checkpoint "att-$by-n$n")" --data "$DATA"
      done ;;
    mos)  # Table 7
      for key in $KEYS; do
        for r in ${MOS_RS:-2 3}; do
          train_head "mos-$key-r$r" --ds-kind mos --ds-key "$key" --mos-components "$r"
          add_component "mos-$key-r$r" --checkpoint "$(head_checkpoint "mos-$key-r$r")" --data "$DATA"
          train_head "mos-$key-r$r-ft" --ds-kind mos --ds-key "$key" --mos-components "$r" --mos-train-output
          add_component "mos-$key-r$r-ft" --checkpoint "$(head_checkpoint "mos-$key-r$r-ft")" --data "$DATA"
        done
      done ;;
    clusters)  # Appendix C.3
      c=${CLUSTER_C:-1}
      clusters=$RUN_DIR/clusters/att-c$c
      [ -f "$clusters/meta.json" ] || knnlm replace clusters --datastore "$ATT_STORE" --per-word "$c" \
        --train-size "${CLUSTER_TRAIN_SIZE:-500000}" --data "$DATA" --out "$clusters"
      add_component "clusters-att-c$c" --clusters "$clusters"
      train_head "clusters-att-c$c-ft" --ds-kind clusters --ds-key att --ds-clusters "$clusters" --ds-train-centroids
      add_component "clusters-att-c$c-ft" --checkpoint "$(head_checkpoint "clusters-att-c$c-ft")" --data "$DATA" ;;
    appendix_e)  # Tables 8, 9 and Figure 8; APPENDIX_E picks the parts
      for what in ${APPENDIX_E:-interpolated distill topk ensemble overfit}; do
        case $what in
          interpolated)
            train_head "att-n1-interp" --ds-key att --ds-n 1 --ds-loss interpolated --ds-loss-lambda 0.25
            add_component "learned-att-n1-interp" --checkpoint "$(head_checkpoint att-n1-interp)" --data "$DATA" ;;
          distill)
            train_head "att-n1-distill" --ds-key att --ds-n 1 --ds-loss distill
            add_component "learned-att-n1-distill" --checkpoint "$(head_checkpoint att-n1-distill)" --data "$DATA" ;;
          topk)  # one pass per split serves every (k, τ); components are named topk-k<k>-t<τ>
            ks=$(echo "${TOPK_KS:-1 2 4 8 16 32 64 128 256 512 1024 33280}" | tr ' ' ,)
            temps=$(echo "${TOPK_TEMPS:-1 2 3}" | tr ' ' ,)
            for split in valid test; do
              knnlm eval component --cache "$PIPELINE/cache/$split" --name topk --topk "$ks" \
                --temperature "$temps" --checkpoint "$CHECKPOINT" --data "$DATA"
            done ;;
          ensemble)
            [ -n "${SEED2_CKPT:-}" ] || die "APPENDIX_E=ensemble needs SEED2_CKPT (an LM trained from another seed)"
            add_lm_cache ensemble-seed2 "$SEED2_CKPT" ;;
          overfit)
            overfit=$RUN_DIR/overfit
            if [ ! -f "$overfit/train.done" ]; then
              mkdir -p "$overfit"
              step "continue the base LM without dropout for $OVERFIT_UPDATES updates -> $overfit"
              fairseq-train "$DATA" --user-dir "$PWD/knnlm" --task language_modeling --sample-break-mode none \
                --tokens-per-sample "$TPS" --arch "$(checkpoint_arch "$CHECKPOINT")" --criterion activation_l2 \
                --activation-weight 0 --restore-file "$CHECKPOINT" --reset-optimizer --reset-dataloader \
                --reset-meters --reset-lr-scheduler --dropout 0 --attention-dropout 0 --activation-dropout 0 \
                --optimizer adam --adam-betas '(0.9,0.98)' --lr "$LR" --max-update "$OVERFIT_UPDATES" \
                --max-tokens "${MAX_TOKENS:-2048}" --seed 1 --num-workers 0 --save-dir "$overfit" \
                --no-epoch-checkpoints --no-save-optimizer-state --disable-validation --ddp-backend legacy_ddp \
                --log-format simple --log-interval 50 $([ "$SCALE" = small ] && echo --cpu) \
                >> "$overfit/train.log" 2>&1 \
                || { tail -n 20 "$overfit/train.log" >&2; die "fairseq-train failed; see $overfit/train.log"; }
              touch "$overfit/train.done"
            fi
            add_lm_cache overfit "$overfit/checkpoint_last.pt" ;;
          *) die "unknown part '$what' in APPENDIX_E" ;;
        esac
      done ;;
    *) die "unknown experiment '$part' in EXPERIMENTS" ;;
  esac
done

# every component both caches hold (also those of earlier runs with other EXPERIMENTS)
args=()
for meta in "$PIPELINE"/cache/valid/components/*/meta.json; do
  [ -f "$meta" ] || continue
  name=$(basename "$(dirname "$meta")")
  [ -f "$PIPELINE/cache/test/components/$name/meta.json" ] && args+=(--component "$name")
done
step "score $((${#args[@]} / 2)) components (${#SCORED[@]} from this run) -> $RESULTS"
rm -f "$RESULTS.tmp"
knnlm score --valid-cache "$PIPELINE/cache/valid" --test-cache "$PIPELINE/cache/test" "${args[@]}" \
  --label scale="$SCALE" --label cache=full --out "$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
# kNN-LM reference rows come from the base LM's own pipeline results
cat "$PIPELINE/results.jsonl" "$RESULTS" > "$RUN_DIR/all.jsonl"
parts=$(knnlm report --list | awk '$1 ~ /^xu2023_(table[256789]|figure[38])$/ { print $1 }' | paste -sd, -)
knnlm report "$RUN_DIR/all.jsonl" --out "$OUT_DIR" --only "$parts" --where labels.cache=full
# how long each head trained (also the heads of earlier runs)
printf 'head\tupdates\tepochs\tbest_update\tbest_valid_ppl\tstopped_by\n' > "$OUT_DIR/heads.tsv"
for dir in "$RUN_DIR"/heads/*/; do
  if [ -f "$dir/train.done" ]; then head_facts "$(basename "$dir")" >> "$OUT_DIR/heads.tsv"; fi
done
echo "report: $OUT_DIR/report.md, heads' training: $OUT_DIR/heads.tsv"
