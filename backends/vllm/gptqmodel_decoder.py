"""GPTQModel as a second, independent decoder of GPTQ folders, run in its own venv.

GPTQModel (with transformers and optimum) lives in ``.venv-gptqmodel`` (tools/setup_gptqmodel.sh),
apart from qexport's venv: :func:`run_gptqmodel` starts ``gptqmodel_run.py`` (beside this file)
under that venv's python, which loads each folder with ``AutoModelForCausalLM.from_pretrained``
on CPU and dumps what GPTQModel's kernel computes (see that script's doc for the result keys).

The venv's python is ``$QEXPORT_GPTQMODEL_PYTHON`` when set (set it empty to turn the decoder off),
else ``.venv-gptqmodel/bin/python`` in the source tree qexport runs from.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import VerifyError

__all__ = ["gptqmodel_python", "run_gptqmodel", "SCRIPT"]

SCRIPT = Path(__file__).with_name("gptqmodel_run.py")
_VENV_PY = Path(__file__).resolve().parents[2] / ".venv-gptqmodel" / "bin" / "python"


def gptqmodel_python() -> Path | None:
    """The python of the GPTQModel venv, or None when there is none."""
    env = os.environ.get("QEXPORT_GPTQMODEL_PYTHON")
    if env == "":
        return None
    p = _VENV_PY if env is None else Path(env)
    return p if p.is_file() else None


def run_gptqmodel(models: list[dict[str, Any]], *, eye: bool = False,
                  prompt_ids: list[int] | None = None, threads: int = 2,
                  python: Path | None = None, timeout: float = 900) -> dict[str, np.ndarray]:
    """Run ``gptqmodel_run.py`` on ``models`` (``[{"key", "path", "backend"}]``); its arrays.

    Raises VerifyError when no GPTQModel venv exists or the subprocess fails (a model that fails
    to load is reported in the result as ``key__error`` instead)."""
    py = python or gptqmodel_python()
    if py is None:
        raise VerifyError(f"no GPTQModel venv ({_VENV_PY} absent and $QEXPORT_GPTQMODEL_PYTHON "
                          "unset): run tools/setup_gptqmodel.sh")
    with tempfile.TemporaryDirectory(prefix="qexport-gptqmodel-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.npz"
        job.write_text(json.dumps({
            "models": [dict(m, path=str(Path(m["path"]).resolve())) for m in models],
            "out": str(out), "eye": eye, "prompt_ids": prompt_ids, "threads": threads}))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        try:
            proc = subprocess.run([str(py), str(SCRIPT), str(job)], env=env, cwd=tmp,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise VerifyError(f"GPTQModel decoder ({py}) ran past {timeout:.0f} s") from e
        if proc.returncode != 0 or not out.is_file():
            raise VerifyError(f"GPTQModel decoder ({py}) failed with exit code "
                              f"{proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        with np.load(out, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
