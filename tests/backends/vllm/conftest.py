"""Fixtures of the vLLM backend tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # vllm_irutil (test helper module beside this file)

REPO = Path(__file__).resolve().parents[3]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PY.is_file():
        pytest.skip(f"{VLLM_PY} absent: run tools/setup_vllm.sh")
    return VLLM_PY


@pytest.fixture(scope="session")
def gptqmodel_python() -> Path:
    from qexport.backends.vllm.gptqmodel_decoder import gptqmodel_python as find
    py = find()
    if py is None:
        pytest.skip(f"{REPO / '.venv-gptqmodel'} absent (or $QEXPORT_GPTQMODEL_PYTHON empty): "
                    "run tools/setup_gptqmodel.sh")
    return py


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tiny_llama):
    """Factory (cached): key -> (folder, QModel) for the tiny_llama exports used by several
    tests. Keys: ct_sym, ct_asym, gptq_sym (4-bit, group 32, float16), ct_sym_lorc (rank 4)."""
    from qexport.backends.vllm import lower_vllm, vllm_spec
    from vllm_irutil import projections, rtn_qmodel

    made: dict = {}
    recipes = {"ct_sym": ("ct", True, 0), "ct_asym": ("ct", False, 0),
               "gptq_sym": ("gptq", True, 0), "ct_sym_lorc": ("ct", True, 4)}

    def get(key: str):
        if key not in made:
            fmt, sym, rank = recipes[key]
            model = rtn_qmodel(tiny_llama, projections(vllm_spec(4, 32, sym, fmt=fmt)),
                               lorc_rank=rank)
            out = tmp_path_factory.mktemp("vllm") / key
            made[key] = (lower_vllm(model, out, fmt=fmt, dtype="float16"), model)
        return made[key]
    return get
