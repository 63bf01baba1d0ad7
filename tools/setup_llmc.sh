#!/usr/bin/env bash
# Idempotent setup of llm-compressor, the peer that tools/bench_vllm.py compares qexport against.
#
#   tools/setup_llmc.sh   -> .venv-llmc with llmcompressor 0.14.0.1 on torch 2.13.0 (CPU)
#
# A benchmark dependency only: tools/setup.sh and CI do not run it (it pulls accelerate, datasets,
# auto-round and a transformers older than .venv-vllm's). llmcompressor 0.14.0.1 accepts
# torch>=2.10,<=2.14, so torch==2.13.0 resolves to the same local CPU build the other venvs use
# (a constraints file keeps every later resolution on it: pip never swaps in a CUDA wheel). The
# CUDA builds of torchvision/torchaudio/torchcodec are removed if anything pulled them in (their
# .so files need libtorch_cuda; see shared/docs/runtimes.md section 1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/venv_lib.sh"
VENV="$ROOT/.venv-llmc"
VERSION="0.14.0.1"
TORCH="2.13.0"

install() {
  local cons
  cons="$(mktemp)"
  echo "torch==$TORCH" > "$cons"
  "$1/bin/pip" install --quiet -c "$cons" "torch==$TORCH" "llmcompressor==$VERSION"
  rm -f "$cons"
  "$1/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$1/bin/pip" uninstall -y triton 2>/dev/null || true
  print_versions setup_llmc.sh "$1" llmcompressor torch transformers compressed-tensors
}
venv_setup setup_llmc.sh "$VENV" "$(pins_check "llmcompressor==$VERSION torch==$TORCH" "" \
  "torchvision torchaudio torchcodec")" install
