"""``--lorc-rank R --lorc-weight hessian`` with the layer-wise methods: the factors minimise the
layer-output error on the calibration inputs (the same Hessian GPTQ rounds with), not the
Frobenius error; options that cannot apply are refused with exit 2 and nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clihelp import assert_clean_failure, run_cli, snapshot

from qexport.irio import load_ir

pytestmark = pytest.mark.slow

GPTQ = ["--method", "gptq", "--bits", "2", "--group-size", "32", "--asym", "--n-samples", "8",
        "--seq-len", "32", "--lorc-rank", "4", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (tests/conftest.py)."""


def test_gptq_hessian_weighted_factors(tiny_llama: Path, calib_file: Path, tmp_path: Path):
    """Layer 0's first linears see the same inputs either way: same codes, other factors;
    later layers may differ (LoRC is in GPTQ's chain). Both runs are deterministic."""
    for name, extra in (("fro", []), ("hess", ["--lorc-weight", "hessian"]),
                        ("hess2", ["--lorc-weight", "hessian"])):
        res = run_cli("quantize", tiny_llama, *GPTQ, *extra, "--calib", calib_file,
                      "-o", tmp_path / name)
        assert res.exit_code == 0, (res.stderr, res.exception)
    fro, hess, again = (load_ir(tmp_path / k) for k in ("fro", "hess", "hess2"))
    assert hess.provenance["options"]["lorc_weight"] == "hessian"
    assert fro.provenance["options"]["lorc_weight"] == "none"
    for m in ("q_proj", "k_proj", "v_proj"):
        n = f"model.layers.0.self_attn.{m}.weight"
        np.testing.assert_array_equal(fro.tensors[n].codes, hess.tensors[n].codes)
        assert not np.array_equal(fro.tensors[n].residual.B, hess.tensors[n].residual.B), n
    for n, qt in hess.tensors.items():
        np.testing.assert_array_equal(qt.residual.A, again.tensors[n].residual.A, err_msg=n)
        np.testing.assert_array_equal(qt.residual.B, again.tensors[n].residual.B, err_msg=n)


@pytest.mark.parametrize("args,needles", [
    (["--method", "rtn", "--lorc-rank", "4", "--lorc-weight", "hessian"],
     ["--lorc-weight hessian", "rtn"]),
    (["--method", "gptq", "--lorc-weight", "hessian"], ["--lorc-weight", "--lorc-rank"]),
    (["--method", "gptq", "--lorc-rank", "4", "--tq-lorc", "chain"], ["--tq-lorc", "tesseraq"]),
    (["--method", "tesseraq", "--tq-lorc", "chain"], ["--tq-lorc chain", "--lorc-rank"]),
    (["--method", "tesseraq", "--lorc-rank", "4", "--tq-lorc", "tune", "--lorc-weight",
      "hessian"], ["--tq-lorc tune", "--lorc-weight hessian"]),
], ids=["rtn", "no-rank", "tq-lorc-with-gptq", "tq-lorc-no-rank", "tune-hessian"])
def test_refused(tiny_llama: Path, calib_file: Path, tmp_path: Path, args, needles):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--bits", "4", "--group-size", "32", *args,
                  "--calib", calib_file, "--quiet", "-o", tmp_path / "ir")
    assert_clean_failure(res, tmp_path, before, *needles)
