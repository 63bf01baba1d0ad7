"""tools/bench_gguf.py: the committed record (``docs/bench/gguf.json``) under the cache: a
recorded step is skipped, and the report rewrites the record without failed steps."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_gguf as bg  # noqa: E402

CMP = {"file_identical": False, "tensors": 2, "tensors_identical": True, "tensors_differ": 0,
       "first_differ": [], "bytes_differ": 0, "bytes_compared": 64, "keys_only_in_a": [],
       "keys_only_in_b": [], "kv_values_differ": [], "kv_order_same": True,
       "tensor_order_same": True}


def test_record_skips_steps_and_drops_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    record = tmp_path / "gguf.json"
    monkeypatch.setattr(bg, "RECORD", record)
    record.write_text(json.dumps({
        "ppl|f32": {"ppl": 20.0, "ppl_err": 0.4, "chunks": 100, "seconds": 3.0},
        "ppl|lq|Q4_0": {"ppl": 25.0, "ppl_err": 0.5, "chunks": 100, "seconds": 2.0},
        "alias|rtn|Q4_0": "lq|Q4_0", "quick_cmp": {"cmp|rtn|lq|Q4_0": CMP}}))
    out = tmp_path / "full"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({
        "ppl|lq|Q4_0": {"ppl": 24.0, "ppl_err": 0.5, "chunks": 100, "seconds": 1.0},
        "build|lq|Q4_0": {"error": "RuntimeError: exit 1", "seconds": 0.5}}))
    b = bg.Bench(bg.Settings(out=out))
    assert b.results["ppl|lq|Q4_0"]["ppl"] == 24.0                   # the cache wins
    assert "quick_cmp" not in b.results                              # not a step

    def never() -> dict:
        raise AssertionError("a recorded step ran")
    assert b.step("ppl|f32", never)["ppl"] == 20.0
    assert b.step("build|lq|Q4_0", lambda: {"error": "again"})["error"] == "again"

    md = tmp_path / "gguf.md"
    bg.write_report(b, ["Q4_0"], md, md.with_suffix(".png"))
    rec = json.loads(record.read_text())
    assert "build|lq|Q4_0" not in rec                                # the failed step
    assert rec["ppl|f32"]["ppl"] == 20.0 and rec["ppl|lq|Q4_0"]["ppl"] == 24.0
    assert rec["alias|rtn|Q4_0"] == "lq|Q4_0"
    assert rec["quick_cmp"] == {"cmp|rtn|lq|Q4_0": CMP}              # no quick cache: kept
    text = md.read_text()
    assert "From the `--quick` run" in text
    walls = json.loads(text.split("```")[1])
    assert set(walls) == {"ppl|f32", "ppl|lq|Q4_0", "build|lq|Q4_0"}
    assert not list(tmp_path.glob("*.tmp"))
