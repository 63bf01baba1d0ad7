"""``--offload-activations``: the calibration residual stream lives in an unlinked temporary
file (mapped, pages released after each layer) and the IR is byte-identical to a run in RAM."""
from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qexport.calib import _Activations
from qexport.cli import main

GPTQ = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--n-samples", "4",
        "--seq-len", "64", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_offloaded_run_gives_the_same_ir(tiny_llama: Path, calib_file: Path,
                                         tmp_path: Path, monkeypatch) -> None:
    made: list[_Activations] = []
    real_init = _Activations.__init__

    def init(self, shape, offload):
        real_init(self, shape, offload)
        made.append(self)
    monkeypatch.setattr(_Activations, "__init__", init)
    outs = {}
    for flag in ([], ["--offload-activations"]):
        out = tmp_path / f"o{len(flag)}.qir"
        r = CliRunner().invoke(main, ["quantize", str(tiny_llama), *GPTQ, "--calib",
                                      str(calib_file), "-o", str(out), *flag])
        assert r.exit_code == 0, r.output
        outs[len(flag)] = _digest(out)
    assert outs[0] == outs[1]
    assert [a.mm is not None for a in made] == [False, True]
    assert isinstance(made[1].mm, mmap.mmap)


def test_activation_file_is_unlinked_and_writable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    act = _Activations((2, 3, 4), offload=True)
    act.h[1] = torch.arange(12, dtype=torch.float32).view(3, 4)
    act.release()                                   # pages handed back; data kept in the file
    assert float(act.h[1, 2, 3]) == 11.0
    assert list(tmp_path.iterdir()) == []           # no name on disk: gone on any exit


def test_offload_refused_for_methods_without_layerwise_calibration(tiny_llama: Path,
                                                                    tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["quantize", str(tiny_llama), "--method", "rtn", "-o",
                                  str(tmp_path / "x.qir"), "--offload-activations"])
    assert r.exit_code == 2
    assert "--offload-activations applies to" in r.output and "not rtn" in r.output
    assert not (tmp_path / "x.qir").exists()
