#!/usr/bin/env bash
# The GPU check: run on a machine with one CUDA GPU, Python 3.12 and torch already installed, no network.
#
#   benchmarks/gpu_check.sh OUT [--dry-run]
#
# It installs the wheels of scripts/device_wheels.txt from .whl/ (scripts/fetch_device_wheels.sh fetches
# them where there is network; about 40 MB), then, with everything on the GPU:
#   1. the GPU-only tests (skipped on CPU machines): fp16 datastore build, exact top-k, GPU index;
#   2. bench_eval.py on the demo corpus: fairseq-eval-lm, the dump, the one-pass task and the two-phase
#      path, exact search with torch on the GPU (faiss-cpu has no GPU search), k = 1024;
#   3. the same over a WikiText-2-sized datastore (2,088,628 keys in the demo model's key space);
#   4. a datastore build of the demo train split on the GPU against one on the CPU.
# Results (at most 8 files) go to OUT: tests.log, eval_demo.{md,json}, eval_wt2size.{md,json},
# datastore.tsv and summary.md. It takes about 6 minutes on one H200.
# --dry-run prints the plan and checks that the wheels it would install are in .whl/ (any machine).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT='' DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: benchmarks/gpu_check.sh OUT [--dry-run]" >&2; exit 2; }
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/knnlm-gpu-check}

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
find_device_wheels "$WHEELS"
missing=$MISSING_WHEELS
wheel_files=("${WHEEL_FILES[@]}")

steps=(
  "install  $PYTHON -m pip install --no-index --no-deps --target $WORK/site <the wheels above>"
  "tests    $PYTHON -m pytest -q -rs tests -k 'gpu' -> $OUT/tests.log"
  "eval     $PYTHON benchmarks/bench_eval.py --device cuda --search exact --reps 2 -> $OUT/eval_demo.md"
  "eval     $PYTHON benchmarks/bench_eval.py --device cuda --search exact --datastore-keys 2088628 --reps 1 -> $OUT/eval_wt2size.md"
  "build    knnlm datastore build --split train (demo) --device cuda vs --device cpu -> $OUT/datastore.tsv"
)
printf 'plan   %s\n' "${steps[@]}"
if [ "$DRY" = 1 ]; then
  [ "$missing" = 0 ] && echo "dry run: every wheel is present" || echo "dry run: some wheels are missing (see above)"
  exit 0
fi
[ "$missing" = 0 ] || { echo "gpu_check.sh: wheels missing; see above" >&2; exit 1; }
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: torch sees no GPU")'

mkdir -p "$OUT" "$WORK"
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "${wheel_files[@]}"
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
KNNLM=("$PYTHON" -m knnlm.cli.main)

SECONDS=0
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests -k gpu 2>&1 | tail -n 30 > "$OUT/tests.log" || true
echo "tests: $(tail -n 1 "$OUT/tests.log") ($SECONDS s)"

"$PYTHON" benchmarks/bench_eval.py --device cuda --search exact --reps 2 --threads 8 \
  --workdir "$WORK/eval" --out "$OUT/eval_demo"
"$PYTHON" benchmarks/bench_eval.py --device cuda --search exact --datastore-keys 2088628 --reps 1 --threads 8 \
  --workdir "$WORK/eval" --out "$OUT/eval_wt2size"
echo "eval: done ($SECONDS s)"

printf 'device\tseconds\n' > "$OUT/datastore.tsv"
for device in cuda cpu; do
  rm -rf "$WORK/ds-$device"
  t0=$SECONDS
  "${KNNLM[@]}" datastore build --checkpoint "$WORK/eval/ckpt/checkpoint_last.pt" --data "$WORK/eval/data-bin/demo" \
    --out "$WORK/ds-$device" --split train --tokens-per-sample 128 --context-window 64 --device "$device" > /dev/null
  printf '%s\t%d\n' "$device" $((SECONDS - t0)) >> "$OUT/datastore.tsv"
done

{
  echo "# GPU check ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1))"
  echo
  echo "GPU-only tests: $(tail -n 1 "$OUT/tests.log")"
  echo
  cat "$OUT/eval_demo.md" "$OUT/eval_wt2size.md"
  echo
  echo "Datastore build of the demo train split (seconds):"
  echo
  cat "$OUT/datastore.tsv"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "gpu_check.sh: done in $SECONDS s; results in $OUT"
