#!/usr/bin/env bash
# Run the benchmark suite on a GPU machine inside one ~10-minute command and leave few files:
#   $OUT/log.txt                         nvidia-smi, versions, the suite's log
#   $OUT/bench/results.{csv,json}        every row, stamped with GPU / driver / CUDA / torch / triton / commit
#   $OUT/bench/summary.md                the markdown tables (copy into benchmarks/results/README.md)
#   $OUT/bench/{norms,attention,attention_memory}.png
#
# usage: OUT=/some/dir [TFKERNELS_COMMIT=<sha>] [BUDGET=330] bash benchmarks/gpu_run.sh [extra suite args]
#   default suite args: --quick (norms N in 1k/4k/16k/64k, attention T in 1k/4k/16k); pass e.g.
#   "--only attention" or "--dtype fp16" to narrow, or "--full" to drop --quick.
# The copy of the tree on the GPU machine may have no .git: set TFKERNELS_COMMIT to stamp the rows.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-330}          # seconds after which the suite starts no new shape (e2e, last, is one block)
HARD_LIMIT=${HARD_LIMIT:-540}  # kill switch under the 10-minute command limit; results are checkpointed after each suite
mkdir -p "$OUT/bench"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

QUICK=--quick
ARGS=()
for a in "$@"; do
  if [ "$a" = "--full" ]; then QUICK=; else ARGS+=("$a"); fi
done

{
  echo "== $(date -u +%FT%TZ)  commit ${TFKERNELS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
  echo "== nvidia-smi"
  nvidia-smi || echo "nvidia-smi failed"
  echo "== versions"
  "$PY" - <<'PYEOF'
import sys
import torch
from benchmarks._util import print_versions
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print_versions(("triton", "numpy", "matplotlib", "flash_attn", "flash_attn_interface", "liger_kernel", "apex",
                "pytest_benchmark"))
PYEOF
} 2>&1 | tee -a "$LOG"   # -a: gpu_session.sh logs its install step first

echo "== python -m benchmarks $QUICK --budget $BUDGET --out $OUT/bench ${ARGS[*]:-}" | tee -a "$LOG"
timeout "$HARD_LIMIT" "$PY" -m benchmarks $QUICK --budget "$BUDGET" --out "$OUT/bench" "${ARGS[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "== exit $rc; files:" | tee -a "$LOG"
ls -la "$OUT/bench" 2>&1 | tee -a "$LOG"
exit "$rc"
