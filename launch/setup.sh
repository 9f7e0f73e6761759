#!/usr/bin/env bash
# Creates .venv and installs dist_train into it. Idempotent: a second run only checks.
#   bash launch/setup.sh          # runtime dependencies
#   bash launch/setup.sh --dev    # plus pytest and ruff
# torch is installed FIRST, so the project's `torch>=...` requirement is already met:
#   - with an NVIDIA GPU (nvidia-smi works): the default PyPI wheel (CUDA build);
#   - without one: the CPU build (TORCH_SPEC, default torch==2.13.0; on machines
#     whose pip does not have a CPU wheel at hand, point TORCH_INDEX_URL at
#     PyTorch's CPU wheel index), so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    "${PIP[@]}" install "${TORCH_SPEC:-torch}"
  else
    echo "setup: no GPU, installing the CPU build of torch (${TORCH_SPEC:-torch==2.13.0})"
    "${PIP[@]}" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
"${PIP[@]}" install -e ".${extra}" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import dist_train, torch, accelerate, deepspeed, webdataset, insightface, onnxruntime" \
  || { echo "setup: the environment is incomplete (see the pip output above)"; exit 1; }
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
