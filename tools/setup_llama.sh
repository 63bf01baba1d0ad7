#!/usr/bin/env bash
# Idempotent setup of the llama.cpp runtime used by the GGUF runtime tests.
#
#   tools/setup_llama.sh            -> .venv-llama with llama-cpp-python (portable AVX2 build)
#   tools/setup_llama.sh --tools    -> also llama-quantize / llama-perplexity / llama-imatrix
#                                      built from the same sdist into .cache/llama-tools/
#
# Why -DGGML_NATIVE=OFF: the default -march=native build segfaults on every quantized GGUF
# in ggml_backend_amx_mul_mat on AMX-capable CPUs (see shared/docs/runtimes.md, section 3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/venv_lib.sh"
VENV="$ROOT/.venv-llama"
VERSION="0.3.36"
TOOLS_DIR="$ROOT/.cache/llama-tools"
WANT_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --tools) WANT_TOOLS=1 ;;
    *) echo "setup_llama.sh: unknown argument '$arg' (expected --tools)" >&2; exit 2 ;;
  esac
done

# the shared libraries must load, not only the metadata
install() {
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$1/bin/pip" install "llama-cpp-python==$VERSION" numpy
  print_versions setup_llama.sh "$1" llama_cpp_python
}
venv_setup setup_llama.sh "$VENV" "$(pins_check "llama_cpp_python==$VERSION" llama_cpp)" install

if [ "$WANT_TOOLS" = 1 ]; then
  if [ -x "$TOOLS_DIR/llama-quantize" ] && [ -x "$TOOLS_DIR/llama-perplexity" ] && [ -x "$TOOLS_DIR/llama-imatrix" ]; then
    echo "setup_llama.sh: tools already in $TOOLS_DIR"
  else
    SRC="$ROOT/.cache/llama-src"
    mkdir -p "$SRC" "$TOOLS_DIR"
    if [ ! -d "$SRC/llama_cpp_python-$VERSION" ]; then
      "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
      tar -xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
    fi
    LC="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
    cmake -S "$LC" -B "$LC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build "$LC/build" -j2 --target llama-quantize llama-perplexity llama-imatrix
    for t in llama-quantize llama-perplexity llama-imatrix; do
      cp "$LC/build/bin/$t" "$TOOLS_DIR/$t.tmp" && mv "$TOOLS_DIR/$t.tmp" "$TOOLS_DIR/$t"
    done
    echo "setup_llama.sh: tools in $TOOLS_DIR"
  fi
fi
