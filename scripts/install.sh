#!/usr/bin/env bash
# Installs lightning-maml and its development tools into the current Python environment.
# Where no torch is installed yet, it installs PyTorch's CPU build first: a plain `torch`
# requirement would pull a multi-GB CUDA build. An existing torch (CPU or CUDA) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --retries 0 --no-deps "torch==2.13.0+cpu" \
    --extra-index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[dev]"
