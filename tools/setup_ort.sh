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
VENV="$ROOT/.venv-ort"
VERSION="0.18.0"

have_pkg() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, sys
import onnxruntime_genai  # noqa: F401  (the import itself must work, not only the metadata)
sys.exit(0 if m.version("onnxruntime-genai") == "$VERSION" else 1)
PY
}

if have_pkg; then
  echo "setup_ort.sh: onnxruntime-genai $VERSION already in $VENV"
else
  # a half-built venv fails have_pkg, so it is rebuilt from scratch (pip's cache keeps reruns short)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "onnxruntime-genai==$VERSION" numpy
  "$VENV/bin/python" -c "import onnxruntime_genai as og, onnxruntime as ort; \
print('setup_ort.sh: onnxruntime-genai', og.__version__, 'onnxruntime', ort.__version__)"
fi
