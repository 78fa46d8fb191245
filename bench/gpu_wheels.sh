#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt for the GPU machine (CPython 3.12, x86-64 Linux) into .whl/,
# which the working tree carries there (git ignores it). Run it here, where a package index is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
grep -v '^\s*\(#\|$\)' bench/gpu_wheels.txt | while read -r req; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$req"
done
du -ch .whl/*.whl | tail -1
