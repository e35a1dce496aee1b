#!/usr/bin/env bash
# The prepared GPU check (issue 15): one JSON report in at most 8 minutes on one GPU.
#
#   tools/gpu_check.sh [--wheels DIR] [--out FILE] [tools/gpu_check.py options]
#   make gpu-check GPU_CHECK_ARGS="--wheels wheels --out gpu_check.json"
#
# The machine needs torch with CUDA, transformers, safetensors, pyyaml and tensorboard; the
# rest comes as wheels in DIR (default: ./wheels, or $MEGAPPO_WHEELS), installed offline with
# --no-deps. Fill DIR where there is network (README "GPU check"):
#   pip download --no-deps -d wheels megatron-core==0.16.1 psutil tqdm math-verify latex2sympy2_extended
# Runs from this checkout (PYTHONPATH), so megappo itself needs no wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${MEGAPPO_WHEELS:-wheels}"
OUT="gpu_check.json"
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-python3}"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS (offline, --no-deps)"
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
elif [ "$WHEELS" != "wheels" ]; then
  echo "[gpu_check] --wheels $WHEELS holds no .whl files" >&2
  exit 2
fi
if ! "$PY" -c "import megatron.core, psutil, tqdm" 2> /dev/null; then
  echo "[gpu_check] megatron.core, psutil or tqdm is not importable: bring their wheels (--wheels DIR; see the header)" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 8 minutes in all: gpu_check.py keeps to --budget (460 s) and writes its report; this is the backstop.
exec timeout 480 "$PY" tools/gpu_check.py --out "$OUT" "${PASS[@]+"${PASS[@]}"}"
