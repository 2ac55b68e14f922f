#!/usr/bin/env bash
# A GPU session in stages, each sized for one 10-minute `run` command (benchmarks/GPU_SESSION.md has
# the exact calls and what to do with what comes back):
#
#   OUT=$OUT TFKERNELS_COMMIT=<sha> bash benchmarks/gpu_session.sh tests  # CUDA extension build, then the test
#                                                                          # suite on CUDA, both kernel backends
#   OUT=$OUT TFKERNELS_COMMIT=<sha> bash benchmarks/gpu_session.sh bench [suite args]  # quick kernel suite (gpu_run.sh)
#   OUT=$OUT TFKERNELS_COMMIT=<sha> bash benchmarks/gpu_session.sh e2e    # fine-tuning, pretraining, swap throughput
#
# What each stage leaves (the run tool brings back at most 8 files, at most 2 folders down):
#   tests  log.txt, build.txt (CUDA build output), junit.xml
#   bench  log.txt, bench/{results.csv,results.json,summary.md,norms.png,attention.png,attention_memory.png,
#                         window.md (sliding-window, packed-document and decoding tables)}
#   e2e    log.txt (with profile_step's per-kernel tables), e2e/{finetune.json,finetune.csv,
#                        bench_train.json,bench_train.md,bench_swap_gpt2.json,bench_swap_gpt2.md}
#   (+ build.txt in bench / e2e with BUILD_CUDA=1)
#
# Every stage installs the package first (the machine may be fresh; without the CUDA build that takes
# seconds) and logs nvidia-smi and versions. Each step runs under `timeout`, cut to what is left of
# STAGE_LIMIT, so the stage ends before the command limit and whatever finished is already under $OUT.
#
# Environment:
#   OUT                output folder (required)
#   TFKERNELS_COMMIT   commit stamped on every result (the copy on the GPU machine may have no .git)
#   STAGE_LIMIT=560    seconds for the whole stage (the run tool's limit is 600)
#   BUILD_CUDA=1       bench / e2e: build the CUDA extension too (minutes), so tfkernels-cuda is measured
#   CPU_CHECK=1        no GPU here: say so, skip GPU-only steps, run the rest with small sizes (how this
#                      script is checked off-GPU). Without it, a machine with no GPU is an error.
#   PARTS=triton,cuda  tests: PARTS=triton skips the CUDA build; PARTS=cuda runs only the backend="cuda" cases
#   SANITIZE=0         tests: 1 ends the stage with compute-sanitizer racecheck + memcheck on the C++
#                      attention cases (SANITIZE_K selects them from SANITIZE_FILE, default
#                      tests/test_cuda_backend.py; SANITIZE_CAP=200 s for both)
#   TESTS=tests        tests: the pytest targets (space-separated words)
#   PYTHON=python3  MAXFAIL=20  XDIST=8 (pytest -n, when pytest-xdist is installed; 0 = off)
#   BUILD_CAP=330  TRAIN_STEPS=60   step timeout / sizes
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
STAGE=${1:-}
shift || true  # what follows the stage: bench passes it on to gpu_run.sh (e.g. --only norms,attention)
case "$STAGE" in
  tests | bench | e2e) ;;
  *) echo "usage: OUT=DIR [TFKERNELS_COMMIT=sha] bash benchmarks/gpu_session.sh tests|bench|e2e" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore
export TFKERNELS_CUDA_JIT=0  # never compile csrc/ on first use inside a timed step; it is built on purpose below
export TFKERNELS_CUDA_ARCHS=${TFKERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
LIMIT=${STAGE_LIMIT:-560}
T0=$SECONDS
RC=0  # the first failing step's exit code is the stage's
mkdir -p "$OUT"
LOG="$OUT/log.txt"

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((LIMIT - (SECONDS - T0))); }

# step NAME CAP CMD...: CMD under a timeout of CAP seconds or what is left of the stage (less 15 s),
# its output into the log (STEP_LOG=/dev/null for a command that writes the log itself).
step() {
  local name=$1 cap=$2 t rc t1=$SECONDS
  shift 2
  t=$(($(left) - 15))
  ((t > cap)) && t=$cap
  if ((t < 20)); then
    log "== $name: SKIPPED, $(left) s of the stage left"
    ((RC == 0)) && RC=124
    return 124
  fi
  log "== $name  [timeout ${t} s, $((SECONDS - T0)) s into the stage]: $*"
  # SIGINT first: pytest still writes its junit xml and summary; the trainer returns what it has
  timeout -s INT -k 15 "$t" "$@" 2>&1 | tee -a "${STEP_LOG:-$LOG}"
  rc=${PIPESTATUS[0]}
  log "== $name: exit $rc after $((SECONDS - t1)) s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  ((rc != 0 && RC == 0)) && RC=$rc
  return "$rc"
}

quick_install() {  # editable install without the CUDA build: seconds
  step "pip install -e . (TFKERNELS_BUILD_CUDA=0)" 180 \
    env TFKERNELS_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
}

build_cuda() {  # $1: timeout cap. Full compiler output in build.txt, its tail in the log.
  step "pip install -e . with the CUDA extension (TFKERNELS_BUILD_CUDA=1, archs $TFKERNELS_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)" \
    "$1" bash -c 'TFKERNELS_BUILD_CUDA=1 "$0" -m pip install -v --no-deps --no-build-isolation -e . >"$1" 2>&1
                  rc=$?; tail -n 25 "$1"; exit $rc' "$PY" "$OUT/build.txt" || return
  "$PY" -c "import sys; from tfkernels import _cuda_ext as c; ok = c.is_available()
print('CUDA extension:', 'loaded' if ok else c.unavailable_reason()); sys.exit(0 if ok else 1)" 2>&1 | tee -a "$LOG"
}

env_report() {
  log "== $(date -u +%FT%TZ)  stage $STAGE  commit ${TFKERNELS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo 'unknown (pass TFKERNELS_COMMIT)')}"
  {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
    "$PY" - <<'PYEOF'
import json, torch
from benchmarks._util import env_info, print_versions
print(json.dumps(env_info("cuda" if torch.cuda.is_available() else "cpu")))
print_versions(("tfkernels", "pytest", "xdist", "pytest_timeout", "transformers"))
PYEOF
  } 2>&1 | tee -a "$LOG"
}

finish() {
  log "== stage $STAGE: exit $RC after $((SECONDS - T0)) s; files under \$OUT:"
  (cd "$OUT" && find . -type f | sort | xargs -r ls -l) 2>&1 | tee -a "$LOG"
  local n deep
  n=$(find "$OUT" -type f | wc -l)
  deep=$(find "$OUT" -mindepth 4 -type f | wc -l)
  ((n > 8 || deep > 0)) && log "== WARNING: $n files, $deep more than 2 folders down: the run tool returns 8 files, 2 folders down"
  exit "$RC"
}

pytest_run() {  # NAME CAP JUNIT TARGETS...
  local name=$1 cap=$2 junit=$3 extra=()
  shift 3
  # pytest-xdist: Triton compiles each kernel variant on first use, CPU-bound work that 16 cores share
  if "$PY" -c "import xdist" 2>/dev/null && ((${XDIST:-8} > 0)); then extra+=(-n "${XDIST:-8}"); fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout "${TEST_TIMEOUT:-300}"); fi
  # -x-style: stop after MAXFAIL failures, so a broken build does not spend the stage failing everything
  step "$name" "$cap" "$PY" -m pytest -q -ra --durations=15 --maxfail "${MAXFAIL:-20}" "${extra[@]}" \
    --junitxml "$OUT/$junit" "$@"
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
elif [ "${CPU_CHECK:-0}" = 1 ]; then
  GPU=0
  log "== NO GPU: torch.cuda.is_available() is False here; CPU_CHECK=1, so GPU-only steps are skipped and the rest runs with small sizes"
else
  log "== NO GPU: torch.cuda.is_available() is False here (set CPU_CHECK=1 to check this script on CPU)"
  exit 2
fi

install() {
  if [ "${BUILD_CUDA:-0}" = 1 ] && ((GPU)); then build_cuda 330 || quick_install; else quick_install; fi
}

case "$STAGE" in
  tests)
    # 1. build the CUDA extension first (about a minute on 16 cores), so that one pytest run covers both
    #    kernel backends: the suite's `backend` fixture adds backend="cuda" to every op test once the
    #    extension loads, and tests/test_cuda_backend.py adds the C++-specific cases
    PARTS=${PARTS:-triton,cuda}
    if [[ ,$PARTS, == *,cuda,* ]] && ((GPU)); then
      build_cuda "${BUILD_CAP:-330}" || { log "== the CUDA extension did not build (see build.txt): the suite runs without it"; quick_install; }
    else
      quick_install
    fi
    env_report
    if ((GPU)); then
      read -r -a targets <<<"${TESTS:-tests}"
      [[ ,$PARTS, != *,triton,* ]] && targets+=(-k cuda)  # PARTS=cuda: only the backend="cuda" cases
    else
      log "== NO GPU: no CUDA extension build; the pytest step runs a small CPU selection"
      read -r -a targets <<<"${TESTS:-tests/test_backend.py tests/test_benchmarks_smoke.py::test_finetune_bench_smoke}"
    fi
    # 2. the whole suite on CUDA (SANITIZE=1: all but SANITIZE_CAP seconds of what is left)
    pytest_run "pytest ${targets[*]}" $(($(left) - (${SANITIZE:-0} == 1 && GPU ? ${SANITIZE_CAP:-200} : 0))) junit.xml "${targets[@]}"
    # 3. SANITIZE=1: the C++ attention cases under compute-sanitizer: racecheck (shared-memory hazards
    #    between threads, which the CPU emulation cannot show), then memcheck (out-of-bounds global
    #    accesses). Slow (10-100x), hence a small selection, SANITIZE_K.
    if [ "${SANITIZE:-0}" = 1 ] && ((GPU)); then
      if command -v compute-sanitizer >/dev/null; then
        for tool in racecheck memcheck; do
          step "compute-sanitizer --tool $tool" $((${SANITIZE_CAP:-200} / 2)) compute-sanitizer --tool "$tool" \
            --error-exitcode 3 "$PY" -m pytest -q -x "${SANITIZE_FILE:-tests/test_cuda_backend.py}" \
            -k "${SANITIZE_K:-test_attention and 128}"
        done
      else
        log "== SANITIZE=1 but compute-sanitizer is not on PATH: skipped"
      fi
    fi
    ;;
  bench)
    install
    # gpu_run.sh logs nvidia-smi and versions into the same log.txt and has its own kill switch, set to what is left
    args=()
    ((GPU)) || args=(--smoke)
    STEP_LOG=/dev/null step "benchmarks/gpu_run.sh" 600 \
      env HARD_LIMIT=$(($(left) - 100)) BUDGET="${BUDGET:-300}" OUT="$OUT" PYTHON="$PY" bash benchmarks/gpu_run.sh "${args[@]}" "$@"
    # sliding-window attention (one more file: bench/window.md, the 8th)
    wargs=(--quick)
    ((GPU)) || wargs=(--smoke)
    step "bench_window: sliding-window causal attention vs plain causal, SDPA's dense mask, FlashAttention" 75 \
      env $( ((GPU)) || echo TRITON_INTERPRET=1) "$PY" -m benchmarks.bench_window "${wargs[@]}" --out "$OUT/bench"
    # packed-document attention: its table is appended to window.md (the run tool brings back 8 files)
    DOCS_TMP=$(mktemp -d)
    step "bench_documents: packed-document causal attention vs a dense mask, plain causal, SDPA, FlashAttention varlen" 75 \
      env $( ((GPU)) || echo TRITON_INTERPRET=1) "$PY" -m benchmarks.bench_documents "${wargs[@]}" --out "$DOCS_TMP"
    if [[ -f "$DOCS_TMP/documents.md" ]]; then
      { echo; cat "$DOCS_TMP/documents.md"; } >> "$OUT/bench/window.md"
    fi
    # decoding against a KV cache: its table appended to window.md too
    step "bench_decode: split-KV decoding vs one pass, the training kernel, SDPA, flash_attn_with_kvcache" 75 \
      env $( ((GPU)) || echo TRITON_INTERPRET=1) "$PY" -m benchmarks.bench_decode "${wargs[@]}" --out "$DOCS_TMP"
    if [[ -f "$DOCS_TMP/decode.md" ]]; then
      { echo; cat "$DOCS_TMP/decode.md"; } >> "$OUT/bench/window.md"
    fi
    # head dim 256: the cuda backend's two dK/dV launches against its one-launch kernel (needs BUILD_CUDA=1
    # for the cuda rows), Triton, SDPA flash; appended to window.md too
    step "bench_head256: D = 256 backward, two dK/dV launches vs one (TFKERNELS_CUDA_DKDV_PASSES=1)" 75 \
      env $( ((GPU)) || echo TRITON_INTERPRET=1) "$PY" -m benchmarks.bench_head256 "${wargs[@]}" --out "$DOCS_TMP"
    if [[ -f "$DOCS_TMP/head256.md" ]]; then
      { echo; cat "$DOCS_TMP/head256.md"; } >> "$OUT/bench/window.md"
    fi
    ;;
  e2e)
    install
    env_report
    E2E="$OUT/e2e"
    TMP=$(mktemp -d)  # bench_train also writes per-run folders: only its two summary files are kept
    mkdir -p "$E2E"
    # the GPU arguments; without a GPU the same arguments are parsed, then small sizes appended override them
    # --ablate: the fused norms alone and the fused attention alone too, to say which half of the kernels
    # the step's difference to plain PyTorch comes from
    train=(--preset gpt2-124m --batch-size 16 --steps "${TRAIN_STEPS:-60}" --ablate --out "$TMP/train")
    ft=(--preset bert-base --batch 32 --seq 128 --compile --json "$E2E/finetune.json" --csv "$E2E/finetune.csv")
    swap=(--model gpt2 --batch 8 --seq 1024 --out "$E2E")
    if ((!GPU)); then
      train+=(--preset tiny --batch-size 4 --steps 4 --only torch,tfkernels)
      ft+=(--preset tiny --batch 4 --seq 32 --steps 2 --warmup 1)
    fi
    # host time per op call with real launches (seconds): is the small-shape floor the host's?
    if ((GPU)); then
      step "host_overhead: host us per op call on the GPU, launches included (triton, then cuda)" 60 \
        bash -c '"$0" -m benchmarks.host_overhead --device cuda --calls 500 &&
                 { ! "$0" -c "import sys; from tfkernels import _cuda_ext as c; sys.exit(0 if c.is_available() else 1)" ||
                   "$0" -m benchmarks.host_overhead --device cuda --backend cuda --calls 500; }' "$PY"
    fi
    # fine-tuning first: no other stage measures it (the bench stage's suite can rerun bench_train)
    step "bench_finetune: bert-base classifier step, tfkernels vs torch, eager and compiled" 180 \
      "$PY" benchmarks/bench_finetune.py "${ft[@]}"
    step "bench_train: gpt2-124m pretraining step, tfkernels vs torch, eager and compiled" 250 \
      "$PY" benchmarks/bench_train.py "${train[@]}"
    cp "$TMP"/train/bench_train.{json,md} "$E2E"/ 2>/dev/null || log "== bench_train wrote nothing"
    # where the step's time goes, torch against tfkernels (its tables go to the log: the files would
    # pass the run tool's 8)
    prof=(--preset gpt2-124m --batch-size 16 --out "$TMP/profile")
    ((GPU)) || prof+=(--preset tiny --batch-size 2 --block-size 16 --warmup 1 --steps 1)
    step "profile_step: torch.profiler over gpt2-124m training steps, per kernel, torch vs tfkernels" 150 \
      "$PY" benchmarks/profile_step.py "${prof[@]}"
    if ((GPU)); then
      step "bench_swap: HF GPT-2 fwd+bwd, unswapped vs tfkernels.swap" 120 "$PY" benchmarks/bench_swap.py "${swap[@]}"
    else
      log "== NO GPU: bench_swap needs CUDA; it should parse its arguments and then say so:"
      "$PY" benchmarks/bench_swap.py "${swap[@]}" 2>&1 | tee -a "$LOG"
    fi
    rm -rf "$TMP"
    ;;
esac
finish
