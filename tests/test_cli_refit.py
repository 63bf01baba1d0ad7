"""``--refit N`` through the CLI: the IR's codes and grids are GPTQ's, re-fitted; the layer
objective recorded per tensor falls; provenance records the rounds; the run is deterministic;
methods it does not apply to are refused with exit 2 and nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clihelp import assert_clean_failure, run_cli, snapshot

from qexport.irio import load_ir

pytestmark = pytest.mark.slow

ARGS = ["--bits", "3", "--group-size", "32", "--asym", "--n-samples", "8", "--seq-len", "32",
        "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (tests/conftest.py)."""


def test_refit_lowers_every_layer_objective(tiny_llama: Path, calib_file: Path, tmp_path: Path):
    for name, extra in (("plain", []), ("refit", ["--refit", "2"]), ("again", ["--refit", "2"])):
        res = run_cli("quantize", tiny_llama, "--method", "leanquant", *ARGS, *extra,
                      "--calib", calib_file, "-o", tmp_path / name)
        assert res.exit_code == 0, (res.stderr, res.exception)
    plain, refit, again = (load_ir(tmp_path / k) for k in ("plain", "refit", "again"))
    assert refit.provenance["options"]["refit"] == 2
    assert plain.provenance["options"]["refit"] == 0
    n0 = "model.layers.0.self_attn.q_proj.weight"     # same inputs in both runs
    assert refit.tensors[n0].stats["objective"] < plain.tensors[n0].stats["objective"]
    for n, qt in refit.tensors.items():
        if "objective" in qt.stats:
            assert qt.stats["objective"] <= qt.stats["refit_objective0"], n
            np.testing.assert_array_equal(qt.codes, again.tensors[n].codes)
            for k, v in qt.grid.arrays().items():
                np.testing.assert_array_equal(v, again.tensors[n].grid.arrays()[k])


@pytest.mark.parametrize("method,needle", [("rtn", "not rtn"), ("tesseraq", "tunes its scales"),
                                           ("leanquant-nu", "not leanquant-nu")])
def test_refit_refused(tiny_llama: Path, calib_file: Path, tmp_path: Path, method, needle):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", method, *ARGS, "--refit", "1",
                  "--calib", calib_file, "-o", tmp_path / "out")
    assert_clean_failure(res, tmp_path, before, "--refit", needle)


@pytest.mark.parametrize("target", [["--to", "gguf", "--type", "Q4_K_M"],
                                    ["--to", "onnx", "--bits", "4", "--group-size", "32"]])
def test_refit_artifacts_verify(tiny_llama: Path, calib_file: Path, tmp_path: Path, target):
    """Re-fitted grids lower like any other: the artifact decodes to the IR bit for bit."""
    out = tmp_path / ("m.gguf" if "gguf" in target else "onnx")
    res = run_cli("convert", tiny_llama, *target, "--method", "leanquant", "--refit", "1",
                  "--n-samples", "8", "--seq-len", "32", "--calib", calib_file, "--quiet",
                  "--save-ir", tmp_path / "ir", "-o", out)
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert load_ir(tmp_path / "ir").provenance["options"]["refit"] == 1
    res = run_cli("verify", out, "--ir", tmp_path / "ir")
    assert res.exit_code == 0 and "OK: artifact matches the IR" in res.output, res.output


def test_refit_sub_lowers_super_block_objectives_and_verifies(tiny_llama: Path, calib_file: Path,
                                                             tmp_path: Path):
    """``--refit-sub``: the k-quant tensors' sub-scales are re-chosen (recorded per tensor), no
    tensor ends above the ``d``-only re-fit, and the GGUF decodes to the IR bit for bit."""
    base = ["convert", tiny_llama, "--to", "gguf", "--type", "Q3_K_M", "--method", "leanquant",
            "--refit", "1", "--n-samples", "8", "--seq-len", "32", "--calib", calib_file,
            "--quiet"]
    for name, extra in (("plain", []), ("sub", ["--refit-sub"])):
        res = run_cli(*base, *extra, "--save-ir", tmp_path / f"ir-{name}",
                      "-o", tmp_path / f"{name}.gguf")
        assert res.exit_code == 0, (res.stderr, res.exception)
    plain, sub = (load_ir(tmp_path / f"ir-{k}") for k in ("plain", "sub"))
    assert sub.provenance["options"]["refit_sub"] is True
    assert plain.provenance["options"]["refit_sub"] is False
    # a layer-0 k-quant tensor: the same inputs (so Hessian) in both runs
    n0 = next(n for n, qt in sub.tensors.items()
              if n.startswith("model.layers.0.") and "refit_sub_rows" in qt.stats)
    assert sub.tensors[n0].stats["objective"] <= plain.tensors[n0].stats["objective"]
    assert any(qt.stats.get("refit_sub_rows", 0) > 0 for qt in sub.tensors.values())
    res = run_cli("verify", tmp_path / "sub.gguf", "--ir", tmp_path / "ir-sub")
    assert res.exit_code == 0 and "OK: artifact matches the IR" in res.output, res.output


def test_refit_sub_needs_refit(tiny_llama: Path, calib_file: Path, tmp_path: Path):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", "leanquant", *ARGS, "--refit-sub",
                  "--calib", calib_file, "-o", tmp_path / "out")
    assert_clean_failure(res, tmp_path, before, "--refit-sub", "add --refit")


def test_cd_lowers_the_objective_alone_and_in_refit_rounds(tiny_llama: Path, calib_file: Path,
                                                          tmp_path: Path):
    """``--cd P``: alone, the first tensor's objective (same inputs in every run) falls below
    the method's; inside ``--refit 1`` below the re-fit's; provenance records it."""
    runs = (("plain", []), ("cd", ["--cd", "2"]), ("refit", ["--refit", "1"]),
            ("refit-cd", ["--refit", "1", "--cd", "2"]))
    for name, extra in runs:
        res = run_cli("quantize", tiny_llama, "--method", "leanquant", *ARGS, *extra,
                      "--calib", calib_file, "-o", tmp_path / name)
        assert res.exit_code == 0, (res.stderr, res.exception)
    irs = {k: load_ir(tmp_path / k) for k, _ in runs}
    assert irs["cd"].provenance["options"]["cd"] == 2
    n0 = "model.layers.0.self_attn.q_proj.weight"
    obj = {k: ir.tensors[n0].stats["objective"] for k, ir in irs.items()}
    assert obj["cd"] < obj["plain"] and obj["refit-cd"] < obj["refit"] < obj["plain"]
    assert irs["cd"].tensors[n0].stats["cd_changed"] > 0


def test_cd_refused_with_rtn(tiny_llama: Path, calib_file: Path, tmp_path: Path):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", "rtn", *ARGS, "--cd", "1",
                  "-o", tmp_path / "out")
    assert_clean_failure(res, tmp_path, before, "--cd", "not rtn")
