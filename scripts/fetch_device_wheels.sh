#!/usr/bin/env bash
# Fetch the CPython 3.12 manylinux wheels of scripts/device_wheels.txt into .whl/ (git-ignored), for a
# GPU machine without network: `benchmarks/gpu_check.sh` and `scripts/gpu_reproduce.sh` install them there.
# antlr4-python3-runtime publishes no wheel: it is built here (pure Python, any 3.x).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
grep -v '^#' scripts/device_wheels.txt | while read -r pin; do
  [ -n "$pin" ] || continue
  if [[ $pin == antlr4-python3-runtime* ]]; then
    "$PYTHON" -m pip wheel --quiet --no-deps "$pin" -w "$DEST"
  else
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" --platform any -d "$DEST" "$pin"
  fi
done
du -sh "$DEST"
