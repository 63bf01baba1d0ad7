"""``--e2e N`` through the CLI: the codes are the method's, the floats move, the tuned model's
KL to the FP model falls on held-out windows, the run is deterministic, the GGUF decodes to the
IR bit for bit; options it cannot honour are refused with exit 2 and nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clihelp import assert_clean_failure, run_cli, snapshot

from qexport.irio import load_ir

pytestmark = pytest.mark.slow

BASE = ["--to", "gguf", "--type", "Q4_0", "--method", "leanquant", "--n-samples", "8",
        "--seq-len", "32", "--quiet"]
E2E = ["--e2e", "4", "--e2e-lr", "3e-3", "--e2e-batch", "2", "--e2e-train-len", "0",
       "--e2e-holdout", "2"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (tests/conftest.py)."""


def test_e2e_keeps_codes_moves_floats_and_verifies(tiny_llama: Path, calib_file: Path,
                                                  tmp_path: Path):
    for name, extra in (("plain", []), ("e2e", E2E), ("again", E2E)):
        res = run_cli("convert", tiny_llama, *BASE, *extra, "--calib", calib_file,
                      "--save-ir", tmp_path / f"ir-{name}", "-o", tmp_path / f"{name}.gguf")
        assert res.exit_code == 0, (res.stderr, res.exception)
    plain, e2e = load_ir(tmp_path / "ir-plain"), load_ir(tmp_path / "ir-e2e")
    assert (tmp_path / "e2e.gguf").read_bytes() == (tmp_path / "again.gguf").read_bytes()
    assert plain.provenance["options"]["e2e_epochs"] == 0 and "e2e" not in plain.provenance
    rec = e2e.provenance["e2e"]
    assert rec["options"]["granularity"] == "row" and rec["options"]["epochs"] == 4
    assert len(rec["epoch_loss"]) == 4
    held = rec["holdout_kl"]
    assert held["after"] < held["before"], held
    moved = 0
    for n, qt in e2e.tensors.items():
        np.testing.assert_array_equal(qt.codes, plain.tensors[n].codes)
        old = plain.tensors[n].grid.arrays()
        moved += any(not np.array_equal(v, old[k]) for k, v in qt.grid.arrays().items())
    assert moved > len(e2e.tensors) // 2
    norm = "model.layers.0.input_layernorm.weight"
    assert not np.array_equal(e2e.passthrough[norm], plain.passthrough[norm])
    assert not list(tmp_path.glob(".*.stream")), "staging folder left behind"
    res = run_cli("verify", tmp_path / "e2e.gguf", "--ir", tmp_path / "ir-e2e")
    assert res.exit_code == 0 and "OK: artifact matches the IR" in res.output, res.output


@pytest.mark.parametrize("extra,needles", [
    (["--e2e-lr", "1e-3"], ("--e2e-lr", "expected with --e2e N")),
    (["--e2e", "1", "--method", "leanquant-nu"], ("--e2e", "leanquant-nu")),
    (["--e2e", "1", "--e2e-holdout", "8"], ("holdout", "fewer than the 8 windows")),
])
def test_e2e_refused(tiny_llama: Path, calib_file: Path, tmp_path: Path, extra, needles):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", "leanquant", "--bits", "4",
                  "--group-size", "32", "--n-samples", "8", "--seq-len", "32", "--quiet",
                  *extra, "--calib", calib_file, "-o", tmp_path / "out")
    assert_clean_failure(res, tmp_path, before, *needles)


def test_e2e_needs_calibration(tiny_llama: Path, tmp_path: Path):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", "rtn", "--bits", "4", "--group-size",
                  "32", "--quiet", "--e2e", "1", "-o", tmp_path / "out")
    assert_clean_failure(res, tmp_path, before, "--e2e", "--calib")
