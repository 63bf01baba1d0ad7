#!/usr/bin/env bash
# Idempotent setup of the onnxruntime-genai runtime used by the ONNX runtime tests.
#
#   tools/setup_ort.sh   -> .venv-ort with onnxruntime-genai 0.18.0 (+ its onnxruntime, numpy)
#
# Only the runtime is installed: og.Model / og.Generator need onnxruntime-genai and numpy.
# torch / transformers / onnx_ir are needed only by genai's own model builder, which qexport
# does not use (it writes the graph and genai_config.json itself). See docs/runtimes.md, sec. 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/venv_lib.sh"
VENV="$ROOT/.venv-ort"
VERSION="0.18.0"

# the import itself must work, not only the metadata
install() {
  "$1/bin/pip" install --quiet "onnxruntime-genai==$VERSION" numpy
  print_versions setup_ort.sh "$1" onnxruntime-genai onnxruntime
}
venv_setup setup_ort.sh "$VENV" "$(pins_check "onnxruntime-genai==$VERSION" onnxruntime_genai)" install
