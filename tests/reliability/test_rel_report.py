"""`qexport report`: report.md / report.png / --json, per-tensor relative error checked against
an independent decode (gguf-py of the exported Q4_0 file, source read with safetensors), and
--quiet / --json across the commands that print."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clihelp import GPTQ_FAST, run_cli

RTN_Q40 = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym"]


@pytest.fixture(scope="module")
def rtn_ir(tmp_path_factory, micro_llama: Path) -> Path:
    out = tmp_path_factory.mktemp("rep") / "m.qir"
    res = run_cli("quantize", micro_llama, *RTN_Q40, "--quiet", "-o", out)
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    return out


def test_report_with_source_matches_gguf_py(rtn_ir: Path, micro_llama: Path,
                                            tmp_path: Path) -> None:
    import gguf
    from safetensors.numpy import load_file
    res = run_cli("report", rtn_ir, "--source", micro_llama, "-o", tmp_path / "rep", "--json",
                  "--quiet")
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    rep = json.loads(res.stdout)
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 0 | 7 |" in md and "| 1 | 7 |" in md and "rel. error" in md
    assert [r["layer"] for r in rep["layers"]] == [0, 1]
    assert rep["error_kind"] == "rel_error" and rep["method"] == "rtn"
    # independent oracle: Q4_0 file decoded by gguf-py, source read by safetensors
    assert run_cli("export", rtn_ir, "--to", "gguf", "-o", tmp_path / "m.gguf").exit_code == 0
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    src = load_file(str(micro_llama / "model.safetensors"))
    rows = {t["name"]: t for t in rep["tensors"]}
    for layer in (0, 1):
        t = next(t for t in r.tensors if t.name == f"blk.{layer}.ffn_down.weight")
        assert t.tensor_type.name == "Q4_0"
        deq = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        W = src[f"model.layers.{layer}.mlp.down_proj.weight"].astype(np.float64)
        want = np.linalg.norm(W - deq.reshape(W.shape)) / np.linalg.norm(W)
        got = rows[f"model.layers.{layer}.mlp.down_proj.weight"]["rel_error"]
        assert got == pytest.approx(want, rel=1e-9)
        assert 0.01 < got < 0.5
    lay0 = [t for t in rep["tensors"] if t["layer"] == 0]
    want0 = np.sqrt(sum(t["sq_err"] for t in lay0) / sum(t["sq_norm"] for t in lay0))
    assert rep["layers"][0]["rel_error"] == pytest.approx(want0)
    assert rep["layers"][0]["bpw"] == pytest.approx(4.5)        # 4-bit codes + fp16 scale / 32


def test_report_without_source_uses_objective(micro_llama: Path, calib_file: Path,
                                              tmp_path: Path) -> None:
    ir = tmp_path / "g.qir"
    assert run_cli("quantize", micro_llama, *GPTQ_FAST, "--calib", calib_file,
                   "-o", ir).exit_code == 0
    res = run_cli("report", ir, "-o", tmp_path / "rep")
    assert res.exit_code == 0, res.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["error_kind"] == "objective"
    assert all(isinstance(r["objective"], float) and r["objective"] > 0 for r in rep["layers"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "objective" in md and "n_samples | 8" in md and "text_sha256" in md
    again = run_cli("report", ir, "-o", tmp_path / "rep")                 # no --force
    assert again.exit_code == 2 and "exists" in again.stderr


def test_quiet_and_json(rtn_ir: Path, micro_llama: Path, calib_file: Path,
                        tmp_path: Path) -> None:
    res = run_cli("quantize", micro_llama, *GPTQ_FAST, "--calib", calib_file,
                  "-o", tmp_path / "q.qir")
    assert res.exit_code == 0 and res.stderr == "", res.stderr       # --quiet: no bars
    loud = run_cli("quantize", micro_llama, *GPTQ_FAST[:-1], "--calib", calib_file,
                   "-o", tmp_path / "l.qir")
    assert loud.exit_code == 0 and "calibrate" in loud.stderr        # bars without --quiet
    ins = run_cli("inspect", rtn_ir, "--json")
    assert ins.exit_code == 0 and json.loads(ins.stdout)["totals"]["quantized_tensors"] == 14
    assert run_cli("export", rtn_ir, "--to", "gguf", "-o", tmp_path / "m.gguf").exit_code == 0
    ver = run_cli("verify", tmp_path / "m.gguf", "--ir", rtn_ir, "--json")
    assert ver.exit_code == 0 and json.loads(ver.stdout)["ok"] is True
    for cmd in ("inspect", "verify", "eval", "report"):
        assert "--json" in run_cli(cmd, "--help").stdout, cmd
