#!/usr/bin/env bash
# One command on a CUDA machine: install the CUDA stack, run the tests marked `gpu`, the compiled-mode
# tests (piecewise CUDA graphs vs --enforce-eager) and the Qwen-VL lossless tests, benchmark the 7B shape (random weights) at 256 and 1,024
# frames with the compiled-vs-eager column, print the table. Sized for a 15-minute GPU lease: the default run
# fits in ~10 minutes (GPU_CHECK_BUDGET_S); every step prints its start and elapsed time.
#
#   scripts/gpu_check.sh                      # the whole check
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh  # print the commands only (any machine)
#
# Knobs (environment): GPU_CHECK_BUDGET_S (600: the whole run's time budget; each step gets what is left),
# GPU_CHECK_SKIP_INSTALL=1 (the .venv already holds the CUDA stack, e.g. a machine without network),
# GPU_CHECK_REPS (2), GPU_CHECK_SYSTEMS (livevlm,vanilla,vllm-streaming), GPU_CHECK_OUT (bench_results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
REPS=${GPU_CHECK_REPS:-2}
SYSTEMS=${GPU_CHECK_SYSTEMS:-livevlm,vanilla,vllm-streaming}
OUT_DIR=${GPU_CHECK_OUT:-bench_results/gpu}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_V2_MODEL_RUNNER=0

step() { echo "[gpu_check +${SECONDS}s] $*"; }

# Run a step within what is left of the budget; a step that overruns ends the check (exit 124).
run() {
    local left=$((BUDGET_S - SECONDS))
    if [ "$DRY_RUN" = 1 ]; then echo "+ timeout $left $*"; return 0; fi
    if [ "$left" -le 0 ]; then step "budget of ${BUDGET_S}s spent before: $*"; exit 124; fi
    timeout --signal=TERM --kill-after=20 "$left" "$@"
}

if [ "$DRY_RUN" != 1 ]; then
    if ! nvidia-smi -L; then echo "gpu_check: no CUDA GPU (nvidia-smi -L failed)" >&2; exit 2; fi
fi

step "1/5 install the CUDA stack (make install TARGET=cuda)"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    step "skipped (GPU_CHECK_SKIP_INSTALL=1): $(cat .venv/.livevlm-stack 2>/dev/null || echo 'no stamp')"
else
    run make install TARGET=cuda
fi

step "2/5 tests marked gpu (pytest -m gpu)"
run "$PY" -m pytest -m gpu -q -p no:cacheprovider

step "3/5 compiled mode: token-exact vs --enforce-eager (fp32), refusals, the op at every step"
run "$PY" -m pytest tests/test_compiled.py -q -p no:cacheprovider

step "4/5 multi-axis models: Qwen2.5-VL / Qwen3-VL lossless streams equal vanilla vLLM (the CUDA M-RoPE kernel)"
run "$PY" -m pytest tests/test_qwen25vl.py tests/test_qwen3vl.py -q -p no:cacheprovider

step "5/5 benchmark: 7b preset, 256 and 1,024 frames, systems $SYSTEMS, $REPS reps, compiled vs eager"
mkdir -p "$OUT_DIR"
run "$PY" -m vllm_livevlm.cli bench --model-preset 7b --lengths 256 --long-lengths 1024 --reps "$REPS" \
    --systems "$SYSTEMS" --compiled --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"

step "done in ${SECONDS}s; the table is printed above and saved in $OUT_DIR (record it in docs/benchmarks.md)"
