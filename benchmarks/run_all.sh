#!/usr/bin/env bash
# Run every benchmark of benchmarks/ with the settings its results file records, one after the
# other, stopping at the first failure. `make bench` calls it with the venv's bin first on PATH.
# THREADS (default 1) is the thread count of every benchmark: torch, faiss, OpenMP, BLAS.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS

# One entry per benchmark: script and arguments (bench_score.py runs with its defaults, see --help).
BENCHMARKS=(
  "bench_score.py"
  "bench_criteria.py --threads $THREADS --steps 2 --reps 15"
  "bench_datastore.py --threads $THREADS"
  "bench_search.py --threads $THREADS"
  "bench_scale.py --threads $THREADS"
  "bench_eval.py --threads $THREADS"
  "bench_replacements.py --threads $THREADS"
  # WikiText-2 scale: needs a trained small model (CKPT) and data-bin/wikitext-2; skipped without them
  "bench_wikitext2.py --threads $THREADS"
)

names=" ${BENCHMARKS[*]%% *} "
for script in benchmarks/bench_*.py; do
  if [[ "$names" != *" $(basename "$script") "* ]]; then
    echo "run_all.sh: $script is not listed in BENCHMARKS; add it with its arguments" >&2
    exit 1
  fi
done

for entry in "${BENCHMARKS[@]}"; do
  read -r -a cmd <<< "$entry"
  if [ "${cmd[0]}" = bench_wikitext2.py ]; then
    if [ -z "${CKPT:-}" ] || [ ! -f data-bin/wikitext-2/dict.txt ]; then
      echo "skipping bench_wikitext2.py: set CKPT=<a WikiText-2 knnlm_transformer_lm_small checkpoint> and prepare data-bin/wikitext-2"
      continue
    fi
    cmd+=(--checkpoint "$CKPT")
  fi
  printf '\n== %s (%s thread(s), started %s)\n' "$entry" "$THREADS" "$(date '+%H:%M:%S')"
  python "benchmarks/${cmd[0]}" "${cmd[@]:1}"
done
printf '\nAll benchmarks done; results in benchmarks/results/\n'
