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
VENV="$ROOT/.venv-llmc"
VERSION="0.14.0.1"
TORCH="2.13.0"

have_pkg() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, importlib.util as u, sys
if m.version("llmcompressor") != "$VERSION" or not m.version("torch").startswith("$TORCH"):
    sys.exit(1)
sys.exit(1 if any(u.find_spec(p) for p in ("torchvision", "torchaudio", "torchcodec")) else 0)
PY
}

if have_pkg; then
  echo "setup_llmc.sh: llmcompressor $VERSION already in $VENV"
else
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  cons="$(mktemp)"
  trap 'rm -f "$cons"' EXIT
  echo "torch==$TORCH" > "$cons"
  "$VENV/bin/pip" install --quiet -c "$cons" "torch==$TORCH" "llmcompressor==$VERSION"
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/pip" uninstall -y triton 2>/dev/null || true
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("setup_llmc.sh:", *(f"{p} {m.version(p)}" for p in
      ("llmcompressor", "torch", "transformers", "compressed-tensors")))
PY
fi
