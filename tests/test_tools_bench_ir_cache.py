"""tools/bench_ir_cache.py: an e2e variant starts from its base variant's cached IR and gives
what the pipeline gives in one go; an adopted IR must have the variant's options."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_ir_cache as bic  # noqa: E402

from qexport.irio import save_ir  # noqa: E402
from qexport.model.load import load_model  # noqa: E402
from qexport.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from qexport.specs import linear_names, plan_uniform, target_spec  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (tests/conftest.py)."""


def _same(a, b) -> None:
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        np.testing.assert_array_equal(a.tensors[n].codes, b.tensors[n].codes)
        for k, v in a.tensors[n].grid.arrays().items():
            np.testing.assert_array_equal(v, b.tensors[n].grid.arrays()[k], err_msg=f"{n} {k}")
    for n in a.passthrough:
        np.testing.assert_array_equal(a.passthrough[n], b.passthrough[n], err_msg=n)


def test_e2e_variant_reuses_the_base_ir(tiny_llama: Path, calib_file: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    src = load_model(tiny_llama)
    plan = plan_uniform(linear_names(src.arch.n_layers), target_spec("ir", 4, 32, False))
    opts = QuantizeOptions(method="rtn", calib=str(calib_file), n_samples=4, seq_len=32,
                           progress=False, e2e_epochs=2,
                           e2e_options={"holdout": 1, "batch": 1, "lr": 3e-3})
    direct = quantize_model(src, plan, opts)
    first = bic.cached_ir(tmp_path, "t", src, plan, opts)
    assert len(list((tmp_path / "ir").iterdir())) == 1
    monkeypatch.setattr("qexport.pipeline.quantize_model",
                        lambda *a, **k: pytest.fail("base IR should come from the cache"))
    again = bic.cached_ir(tmp_path, "t", src, plan, opts)
    _same(direct, first)
    _same(direct, again)
    assert again.provenance["e2e"]["holdout_kl"] == direct.provenance["e2e"]["holdout_kl"]


def test_adopt_ir_checks_options(tiny_llama: Path, calib_file: Path, tmp_path: Path):
    src = load_model(tiny_llama)
    plan = plan_uniform(linear_names(src.arch.n_layers), target_spec("ir", 4, 32, False))
    opts = QuantizeOptions(method="rtn", calib=str(calib_file), n_samples=4, seq_len=32,
                           progress=False)
    save_ir(quantize_model(src, plan, opts), tmp_path / "m.qir")
    with pytest.raises(SystemExit, match="option seed expected 1 \\(found 0\\)"):
        bic.adopt_ir(tmp_path / "c", "t", plan, dataclasses.replace(opts, seed=1),
                     tmp_path / "m.qir")
    other = plan_uniform(linear_names(src.arch.n_layers), target_spec("ir", 3, 32, False))
    with pytest.raises(SystemExit, match="expected grid"):
        bic.adopt_ir(tmp_path / "c", "t", other, opts, tmp_path / "m.qir")
    dst = bic.adopt_ir(tmp_path / "c", "t", plan, opts, tmp_path / "m.qir")
    assert dst.name == f"t-{bic.base_key(plan, opts)}.qir" and dst.is_dir()
