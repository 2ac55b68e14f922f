#!/usr/bin/env bash
# Set up a fresh machine for tfkernels: the CPU build of torch where there is no GPU (fast, from
# the local wheel cache on our machines), then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.6"
  else
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# triton 3.6 is what our GPU machines run; its CPU interpreter calls int() on 1-element arrays,
# which numpy >= 2.4 refuses, so the test environment keeps numpy below 2.4.
"$PY" -m pip install -q "triton==3.6.0" "numpy<2.4"
"$PY" -m pip install -q -e ".[test,hf]" "numpy<2.4" "triton==3.6.0"
