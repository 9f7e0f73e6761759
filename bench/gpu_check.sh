#!/usr/bin/env bash
# GPU check, one call: bench/bench_gpu.py on one NVIDIA GPU. The xl preset at batch 128, 1024 and 8192: bare
# loop (eager, compiled), dist-train one process, ZeRO-2 fp16 and bf16, ZeRO-3, each with and without --compile;
# one table of samples/s, ratio to the bare loop, MFU, peak memory and skipped steps; under 6 minutes
# (--budget-s 330: the rows that do not fit are skipped, most important first, and listed). See bench/GPU_CHECK.md.
#   bash bench/gpu_check.sh
#   PYTHON=python3 bash bench/gpu_check.sh               # an existing interpreter (air-gapped node): no set-up
#   bash bench/gpu_check.sh --batches 128 --modes bare,one,zero2   # any bench_gpu.py option passes through
# PYTHON: used as is when torch, accelerate, deepspeed, webdataset, tensorboard and dist_train import with it;
#   else .venv/bin/python when they import there; else `bash launch/setup.sh` makes .venv (needs a package index).
# GPU (CUDA index in nvidia-smi order, 0), BUDGET_S (330), PEAK_TFLOPS (dense fp16/bf16 peak; from the GPU name
# when unset), OUT (when set: bench_gpu.json, bench_gpu.txt and bench_gpu_logs.tar.gz, the dist-train rows' logs).
# Exit: 0 every row that ran reported, 1 a row failed or the environment is unusable, 2 no NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU: nvidia-smi is not installed. Run this on a machine with an NVIDIA GPU and driver;" \
    "on CPU use bench/bench_trainer.py (or bench/bench_gpu.py --tiny)." >&2
  exit 2
fi
if ! gpus=$(nvidia-smi -L 2>&1) || [ -z "$gpus" ]; then
  echo "gpu_check: no NVIDIA GPU: 'nvidia-smi -L' failed (${gpus%%$'\n'*}). Check the driver, or run this on a" \
    "machine with an NVIDIA GPU; on CPU use bench/bench_trainer.py." >&2
  exit 2
fi

GPU=${GPU:-0}
BUDGET_S=${BUDGET_S:-330}
started=$SECONDS
export CUDA_DEVICE_ORDER=PCI_BUS_ID # CUDA numbers GPUs as nvidia-smi does
export CUDA_VISIBLE_DEVICES=$GPU
export DS_ACCELERATOR=cuda # DeepSpeed's accelerator detection can pick another one on some nodes
echo "gpu_check: $(echo "$gpus" | sed -n "$((GPU + 1))p")"

IMPORTS="import torch, accelerate, deepspeed, webdataset, tensorboard, dist_train"
py=""
if [ -n "${PYTHON:-}" ]; then
  if why=$("$PYTHON" -c "$IMPORTS" 2>&1); then
    py=$PYTHON
  else
    echo "gpu_check: PYTHON=$PYTHON lacks a module (${why##*$'\n'}); trying .venv, then launch/setup.sh" >&2
  fi
fi
if [ -z "$py" ] && [ -x .venv/bin/python ] && .venv/bin/python -c "$IMPORTS" 2>/dev/null; then
  py=.venv/bin/python
fi
if [ -z "$py" ]; then
  if ! bash launch/setup.sh; then
    echo "gpu_check: launch/setup.sh failed. On a node without a package index bring wheels and run with" \
      "PYTHON=python3 (bench/GPU_CHECK.md, ../shared/reference/integration-pitfalls.md §7)." >&2
    exit 1
  fi
  py=.venv/bin/python
fi
# the check needs a CUDA build of torch that sees the GPU
if ! cuda=$("$py" -c "import torch; assert torch.cuda.is_available(), torch.__version__; print(torch.__version__)" \
  2>&1) && [ -z "${GPU_CHECK_ALLOW_CPU:-}" ]; then
  echo "gpu_check: $py: torch cannot use the GPU (${cuda##*$'\n'}); a CPU build of torch, or CUDA_VISIBLE_DEVICES" \
    "hides it. Install the CUDA build (bench/GPU_CHECK.md)." >&2
  exit 1
fi
VERSIONS='import sys, torch, deepspeed; print("python", sys.version.split()[0], "torch", torch.__version__, "deepspeed", deepspeed.__version__)'
echo "gpu_check: $py ($("$py" -c "$VERSIONS" 2>/dev/null)), ready after $((SECONDS - started)) s"

args=(--budget-s "$BUDGET_S")
[ -n "${PEAK_TFLOPS:-}" ] && args+=(--peak-tflops "$PEAK_TFLOPS")
status=0
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")
  "$py" bench/bench_gpu.py "${args[@]}" --json "$OUT/bench_gpu.json" --logs "$logs" "$@" 2>&1 |
    tee "$OUT/bench_gpu.txt" || status=$?
  # one archive: the device tool brings back at most 8 files
  [ -n "$(ls -A "$logs")" ] && tar -czf "$OUT/bench_gpu_logs.tar.gz" -C "$logs" .
  rm -rf "$logs"
else
  "$py" bench/bench_gpu.py "${args[@]}" "$@" || status=$?
fi
echo "gpu_check: finished in $((SECONDS - started)) s (exit $status)${OUT:+; table and rows in $OUT}"
exit "$status"
