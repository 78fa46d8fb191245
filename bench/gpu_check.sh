#!/usr/bin/env bash
# The GPU check of issue #20 in one go (bench/gpu_check.py says what it measures): one JSON summary,
# $OUT/gpu_check.json when OUT is set (the device tool's output folder), else reports/gpu_check/.
#
# On a GPU machine without network: wheels carried with the working tree in .whl/ (bench/gpu_wheels.sh
# downloads them on a machine that has a package index) are installed into a private folder first; the
# machine's own torch, torchvision, onnx and onnxruntime are used as they are. Without CUDA this is a short
# dry run on the CPU. Extra arguments go to bench/gpu_check.py (e.g. --skip cpu, --set train.epochs=4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
export DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
wheels=${GPU_CHECK_WHEELS-.whl}  # GPU_CHECK_WHEELS= (empty): use none (a dry run here, where the venv has all)
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
  site=${LENSMITH_CHECK_SITE:-/tmp/lensmith-check-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 7 minutes at most on a GPU machine, summary included: the script stops starting steps at --budget-s (390 s)
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-420}" "$PY" bench/gpu_check.py "$@"
