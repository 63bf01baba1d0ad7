#!/usr/bin/env bash
# Idempotent setup of GPTQModel's CPU runtime, used by the GPTQ-folder tests and `qexport verify`
# (second decoder of GPTQ folders, backends/vllm/gptqmodel_decoder.py).
#
#   tools/setup_gptqmodel.sh   -> .venv-gptqmodel: gptqmodel 7.6.0, optimum 2.3.0,
#                                 transformers 5.23.0 on torch 2.13.0 (CPU)
#
# Why these versions: gptqmodel 7.7.0 (the newest) requires torch>=2.14.1, and the only 2.14 wheel
# the registry has is the CUDA build (cuda-toolkit 13, nvidia-*, triton: gigabytes); 7.6.0 is the
# newest that accepts torch>=2.8, so it runs on the project's local torch 2.13.0+cpu. Its sdist
# builds no extension (7.x ships the C++/CUDA kernels as sources that torch.utils.cpp_extension
# JIT-compiles only when such a backend is picked), so no CUDA compile and no build flags; the
# CPU kernels used are pure torch: TorchLinear (backend "torch", 2..8 bit) and TorchAtenLinear
# (GPTQModel's "auto" pick on CPU for 4-bit). transformers loads GPTQ
# folders through optimum (GptqHfQuantizer imports optimum.gptq), hence optimum 2.3.0 (`hf`
# extra). transformers 5.23.0 is what pip resolves for gptqmodel 7.6.0 (>=5.14) here; pinned so
# reruns get the verified set. A separate venv: gptqmodel pulls datasets, torchao, pyarrow,
# tokenicer, ... that the main venv does not need. Install: ~1.5 min (pypcre builds from source).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/venv_lib.sh"
VENV="$ROOT/.venv-gptqmodel"
VERSION="7.6.0"
OPTIMUM="2.3.0"
TRANSFORMERS="5.23.0"
TORCH="2.13.0"

install() {
  "$1/bin/pip" install --quiet "torch==$TORCH" "gptqmodel==$VERSION" "optimum==$OPTIMUM" \
    "transformers==$TRANSFORMERS"
  print_versions setup_gptqmodel.sh "$1" gptqmodel optimum transformers torch
}
venv_setup setup_gptqmodel.sh "$VENV" "$(pins_check "gptqmodel==$VERSION optimum==$OPTIMUM \
transformers==$TRANSFORMERS torch==$TORCH")" install
