"""Export streams the IR: ``load_ir(lazy=True)`` + GGUF / vLLM / ONNX lowering hold one quantized tensor
at a time and write the same bytes as lowering the IR held in memory. Oracle for the
safetensors layout: the safetensors library's own ``save_file``."""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qexport.cli import main
from qexport.errors import IRError
from qexport.irio import load_ir
from qexport.irstream import _Backing
from qexport.lowering import lower
from qexport.stfile import OffsetWriter


def _st_entry(t: torch.Tensor) -> tuple[str, tuple[int, ...], int]:
    from qexport.backends.vllm.hf_folder import st_entry
    return st_entry(t)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "a.f16": torch.randn(7, generator=g).half(),
            "c.i32": torch.randint(-9, 9, (4, 2), generator=g, dtype=torch.int32),
            "d.f32": torch.randn(2, 3, generator=g),
            "e.i64": torch.tensor([3, 4]),
            "f.u8": torch.arange(5, dtype=torch.uint8)}


def test_offset_writer_matches_safetensors_library(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from qexport.backends.vllm.hf_folder import st_bytes
    ts = _tensors()
    save_file(ts, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    entries = {k: _st_entry(t) for k, t in ts.items()}
    with OffsetWriter(tmp_path / "ours.safetensors", entries, {"format": "pt"}) as w:
        for k in ["e.i64", "b.bf16", "f.u8", "a.f16", "d.f32", "c.i32"]:    # any order
            w.write(k, st_bytes(ts[k]))
    assert (tmp_path / "ours.safetensors").read_bytes() == \
        (tmp_path / "lib.safetensors").read_bytes()


def test_offset_writer_refuses_missing_wrong_and_unknown(tmp_path: Path) -> None:
    from qexport.backends.vllm.hf_folder import st_bytes
    ts = _tensors()
    entries = {k: _st_entry(t) for k, t in ts.items()}
    w = OffsetWriter(tmp_path / "x.safetensors", entries, None)
    with pytest.raises(IRError, match=r"c.i32: expected 32 bytes \(not 4\)"):
        w.write("c.i32", np.zeros(4, np.uint8))
    with pytest.raises(IRError, match="zz: not in the planned"):
        w.write("zz", np.zeros(4, np.uint8))
    w.write("f.u8", st_bytes(ts["f.u8"]))
    with pytest.raises(IRError, match="f.u8: written twice"):
        w.write("f.u8", st_bytes(ts["f.u8"]))
    with pytest.raises(IRError, match=r"a.f16: planned but never written \(5 tensors missing\)"):
        w.close()


@pytest.fixture(scope="module")
def w4g32_ir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """RTN w4 g32 sym IR (= GGUF Q4_0, vLLM CT/GPTQ 4-bit) of a 4-layer random Llama."""
    from qexport.testing import make_tiny_model
    root = tmp_path_factory.mktemp("xs")
    model = make_tiny_model(root / "m", "llama", hidden=64, intermediate=128, layers=4,
                            heads=2, kv_heads=1, tokenizer_dir=tokenizer_dir)
    out = root / "w4.qir"
    r = CliRunner().invoke(main, ["quantize", str(model), "--method", "rtn", "--bits", "4",
                                  "--group-size", "32", "--sym", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def _files(p: Path) -> dict[str, bytes]:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {f.name: f.read_bytes() for f in sorted(p.iterdir())}


@pytest.mark.parametrize("target,name", [("gguf", "m.gguf"), ("vllm", "m-vllm"),
                                         ("onnx", "m-onnx")])
def test_lazy_export_is_streamed_and_byte_identical(w4g32_ir: Path, tmp_path: Path,
                                                    monkeypatch, target: str,
                                                    name: str) -> None:
    """Lazy lowering equals eager lowering byte for byte, and when a quantized tensor is read
    from the IR, no earlier one is still alive (weak references to their code arrays)."""
    eager = lower(load_ir(w4g32_ir), target, tmp_path / "eager" / name)[0]
    refs: list[weakref.ref] = []
    alive: list[int] = []
    real = _Backing.qtensor

    def qtensor(self, n):
        alive.append(sum(r() is not None for r in refs))
        qt = real(self, n)
        refs.append(weakref.ref(qt.codes))
        return qt
    monkeypatch.setattr(_Backing, "qtensor", qtensor)
    lazy = lower(load_ir(w4g32_ir, lazy=True), target, tmp_path / "lazy" / name)[0]
    assert len(refs) >= 4 * 7
    assert alive == [0] * len(alive), "an earlier QTensor was still held"
    assert _files(lazy) == _files(eager)


def test_cli_export_and_verify_read_lazily(w4g32_ir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["export", str(w4g32_ir), "--to", "gguf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    eager = lower(load_ir(w4g32_ir), "gguf", tmp_path / "e" / "m.gguf")[0]
    assert out.read_bytes() == eager.read_bytes()
    r = CliRunner().invoke(main, ["verify", str(out), "--ir", str(w4g32_ir)])
    assert r.exit_code == 0 and "OK: artifact matches the IR" in r.output, r.output
