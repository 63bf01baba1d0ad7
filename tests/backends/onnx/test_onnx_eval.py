"""``qexport eval`` on an ONNX folder: perplexity through onnxruntime equals the IR's torch
forward (accuracy_level 0) and the output names the runtime and execution provider."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qexport.cli import main


@pytest.fixture(scope="module")
def ir_and_onnx(tiny_llama: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("onnx-eval")
    ir, onnx_dir = root / "m.qir", root / "m-onnx"
    r = CliRunner().invoke(main, ["quantize", str(tiny_llama), "--method", "rtn", "--bits", "4",
                                  "--group-size", "32", "--asym", "-o", str(ir), "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(ir), "--to", "onnx", "-o", str(onnx_dir)])
    assert r.exit_code == 0, r.output
    return ir, onnx_dir


def _eval(target: Path, text: Path, *extra: str) -> dict:
    r = CliRunner().invoke(main, ["eval", str(target), "--text", str(text), "--ctx", "64",
                                  "--windows", "3", "--json", "--quiet", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])


def test_onnx_eval_matches_ir_and_names_provider(ir_and_onnx, calib_file: Path) -> None:
    ir, onnx_dir = ir_and_onnx
    a, b = _eval(ir, calib_file), _eval(onnx_dir, calib_file, "--device", "cpu")
    assert b["provider"] == "CPUExecutionProvider" and b["runtime"].startswith("onnxruntime")
    assert a["provider"] == "torch CPU"
    assert b["tokens_scored"] == a["tokens_scored"] and b["n_windows"] == 3
    assert b["all_targets"] == pytest.approx(a["all_targets"], rel=1e-4)
    assert b["second_half"] == pytest.approx(a["second_half"], rel=1e-4)


def test_onnx_eval_text_line_says_which_provider_ran(ir_and_onnx, calib_file: Path) -> None:
    _, onnx_dir = ir_and_onnx
    r = CliRunner().invoke(main, ["eval", str(onnx_dir), "--text", str(calib_file), "--ctx",
                                  "64", "--windows", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.output and "ExecutionProvider" in r.output
