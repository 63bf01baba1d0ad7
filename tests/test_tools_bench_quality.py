"""tools/bench_quality.py: the committed record under the cache, and ``--merge-from`` (a
parallel run's finished cells, results entries and files, move into the main cache; failed or
already-measured cells stay; a different FP evaluation is refused)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_quality as bq  # noqa: E402

FP = {"ppl_all": 29.5, "ppl_second_half": 23.6}


def _cell(d: Path, label: str, column: str, ppl: float | None) -> tuple[str, dict]:
    key = bq._file_key(label, column)
    (d / f"{key}.qir").mkdir()
    (d / f"{key}.qir" / "manifest.json").write_text("{}")
    (d / f"{key}.eval.json").write_text(json.dumps({"ppl": ppl}))
    entry = {"error": "exit 1"} if ppl is None else {"method": label, "column": column,
                                                     "ppl_all": ppl}
    return f"{label}|{column}", entry


def test_merge_cells(tmp_path: Path):
    src, out = tmp_path / "s", tmp_path / "main"
    src.mkdir(), out.mkdir()
    cells = dict([_cell(src, "gptq + LoRC r8", "W2 g64 asym", 10.0),
                  _cell(src, "rtn", "W3 g128 asym", None),
                  _cell(src, "leanquant", "W4 g128 sym", 5.0)])
    (src / "results.json").write_text(json.dumps({"fp": FP, **cells}))
    results = {"fp": FP, "leanquant|W4 g128 sym": {"ppl_all": 4.0}}
    moved = bq.merge_cells(src, out, results)
    assert moved == ["gptq + LoRC r8|W2 g64 asym"]
    assert results["gptq + LoRC r8|W2 g64 asym"]["ppl_all"] == 10.0
    assert results["leanquant|W4 g128 sym"] == {"ppl_all": 4.0}        # kept, not replaced
    key = bq._file_key("gptq + LoRC r8", "W2 g64 asym")
    assert (out / f"{key}.qir" / "manifest.json").is_file() and not (src / f"{key}.qir").exists()
    assert (src / f"{bq._file_key('rtn', 'W3 g128 asym')}.qir").is_dir()  # failed: left
    assert bq.merge_cells(src, out, results, replace=True) == ["leanquant|W4 g128 sym"]
    assert results["leanquant|W4 g128 sym"]["ppl_all"] == 5.0


def test_merge_refuses_another_fp(tmp_path: Path):
    (tmp_path / "results.json").write_text(json.dumps({"fp": {"ppl_all": 30.1}}))
    with pytest.raises(SystemExit, match="29.5"):
        bq.merge_cells(tmp_path, tmp_path / "o", {"fp": FP})


def test_record_seeds_the_cache_and_is_rewritten(tmp_path: Path, monkeypatch):
    """A fresh cache starts from the committed record (its cells count as measured, the cache
    wins where both hold one); writing the report rewrites the record without failed cells."""
    rec = tmp_path / "methods.json"
    monkeypatch.setattr(bq, "RECORD", rec)
    monkeypatch.setattr(bq, "REPO", tmp_path)
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    rec.write_text(json.dumps({"fp": FP, "rtn|W4 g128 sym": {"ppl_all": 44.6, "bpw": 4.1,
                                                             "quantize_seconds": 23}}))
    rf = tmp_path / "cache" / "results.json"
    assert bq.load_results(rf)["rtn|W4 g128 sym"]["ppl_all"] == 44.6     # no cache yet
    rf.parent.mkdir()
    rf.write_text(json.dumps({"rtn|W4 g128 sym": {"ppl_all": 44.0, "bpw": 4.1,
                                                  "quantize_seconds": 20},
                              "gptq|W4 g128 sym": {"error": "exit 1"}}))
    results = bq.load_results(rf)
    assert results["rtn|W4 g128 sym"]["ppl_all"] == 44.0 and results["fp"] == FP
    bq.write_methods(results)
    ok = {k: v for k, v in results.items() if k != "gptq|W4 g128 sym"}
    assert json.loads(rec.read_text()) == ok
    assert "44.00" in (tmp_path / "docs" / "bench" / "methods.md").read_text()
