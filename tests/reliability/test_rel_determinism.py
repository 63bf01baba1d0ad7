"""Deterministic and atomic output: the same run gives the same bytes for every target (IR,
.gguf + LoRA adapter, ONNX folder, vLLM folder + PEFT adapter), and a failure half-way through
writing leaves neither the artifact nor a temporary sibling behind."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from clihelp import GPTQ_FAST, run_cli, snapshot

# target -> (output name, extra files/folders written beside it)
TARGETS = {"gguf": ("m.gguf", ["m.lora.gguf"]), "onnx": ("m-onnx", []),
           "vllm": ("m-vllm", ["m-vllm-lora"])}


def _quantize(model: Path, calib: Path, out: Path) -> dict[str, str]:
    res = run_cli("quantize", model, *GPTQ_FAST, "--lorc-rank", "4", "--calib", calib, "-o", out)
    assert res.exit_code == 0, res.stderr or res.exception
    assert not Path(str(out) + ".partial").exists(), "checkpoint folder left after success"
    return snapshot(out)


@pytest.fixture(scope="module")
def lorc_ir(tmp_path_factory, micro_llama: Path, calib_file: Path) -> Path:
    out = tmp_path_factory.mktemp("det") / "a.qir"
    _quantize(micro_llama, calib_file, out)
    return out


def test_ir_is_byte_identical_across_runs(lorc_ir: Path, micro_llama: Path, calib_file: Path,
                                          tmp_path: Path) -> None:
    again = _quantize(micro_llama, calib_file, tmp_path / "b.qir")
    first = snapshot(lorc_ir)
    assert set(first) == {"manifest.json", "tensors.safetensors", "tokenizer/tokenizer.json",
                          "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json"}
    assert again == first
    assert "seconds" not in (lorc_ir / "manifest.json").read_text()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_export_is_byte_identical_across_runs(lorc_ir: Path, tmp_path: Path, target: str) -> None:
    name, extras = TARGETS[target]
    hashes = []
    for _ in range(2):                 # same path twice: adapters record their base by path
        res = run_cli("export", lorc_ir, "--to", target, "-o", tmp_path / name)
        assert res.exit_code == 0, res.stderr or res.exception
        for extra in extras:
            assert (tmp_path / extra).exists(), f"LoRC adapter {extra} not written"
        hashes.append(snapshot(tmp_path))
        for p in [name, *extras]:
            shutil.rmtree(tmp_path / p) if (tmp_path / p).is_dir() else (tmp_path / p).unlink()
    assert hashes[0] == hashes[1]
    assert len(hashes[0]) >= 1 + len(extras)


def _partial_writer(real_bytes: bytes = b"partial"):
    """A writer that leaves a few bytes in its file, then fails like a full disk."""
    def write(*args, **kwargs):
        path = next(str(a) for a in args if isinstance(a, (str, Path)) and "/" in str(a))
        Path(path).write_bytes(real_bytes)
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return write


def _assert_nothing_at(folder: Path, name: str) -> None:
    left = sorted(p.name for p in folder.iterdir() if name in p.name)
    assert left == [], f"left behind: {left}"


def test_failing_ir_write_leaves_nothing(lorc_ir: Path, tmp_path: Path, monkeypatch) -> None:
    from qexport import irio
    qm = irio.load_ir(lorc_ir)
    monkeypatch.setattr(irio, "save_file", _partial_writer())
    with pytest.raises(OSError):
        irio.save_ir(qm, tmp_path / "x.qir")
    _assert_nothing_at(tmp_path, "x.qir")


def test_failing_gguf_write_leaves_nothing(lorc_ir: Path, tmp_path: Path, monkeypatch) -> None:
    import gguf

    from qexport.irio import load_ir
    from qexport.lowering import lower
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def half(self, *a, **kw):              # header, metadata and 3 tensors are on disk
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("packer failed mid-way")
        return real(self, *a, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", half)
    with pytest.raises(RuntimeError, match="mid-way"):
        lower(load_ir(lorc_ir), "gguf", tmp_path / "x.gguf")
    _assert_nothing_at(tmp_path, "x.")


def _raise_after(n: int, target: str):
    import importlib
    mod, attr = target.rsplit(".", 1)
    real = getattr(importlib.import_module(mod), attr)
    count = [0]

    def wrapped(*a, **kw):
        count[0] += 1
        if count[0] > n:
            raise RuntimeError("packer failed mid-way")
        return real(*a, **kw)
    return wrapped


def test_failing_onnx_write_leaves_nothing(lorc_ir: Path, tmp_path: Path, monkeypatch) -> None:
    from qexport.irio import load_ir
    from qexport.lowering import lower

    def boom(tmp, *a, **kw):               # model.onnx + data are on disk by now
        assert (Path(tmp) / "model.onnx").exists()
        raise RuntimeError("genai config failed mid-way")
    monkeypatch.setattr("qexport.backends.onnx.lower.write_genai_files", boom)
    with pytest.raises(RuntimeError, match="mid-way"):
        lower(load_ir(lorc_ir), "onnx", tmp_path / "x-onnx")
    _assert_nothing_at(tmp_path, "x-onnx")


def test_failing_vllm_write_leaves_nothing(lorc_ir: Path, tmp_path: Path, monkeypatch) -> None:
    from qexport.irio import load_ir
    from qexport.lowering import lower
    monkeypatch.setattr("qexport.backends.vllm.lower.write_safetensors", _partial_writer())
    with pytest.raises(OSError):
        lower(load_ir(lorc_ir), "vllm", tmp_path / "x-vllm")
    _assert_nothing_at(tmp_path, "x-vllm")


def test_failing_vllm_packer_leaves_nothing(lorc_ir: Path, tmp_path: Path, monkeypatch) -> None:
    from qexport.irio import load_ir
    from qexport.lowering import lower
    monkeypatch.setattr("qexport.backends.vllm.lower.ct_layer_tensors",
                        _raise_after(5, "qexport.backends.vllm.lower.ct_layer_tensors"))
    with pytest.raises(RuntimeError, match="mid-way"):
        lower(load_ir(lorc_ir), "vllm", tmp_path / "x-vllm")
    _assert_nothing_at(tmp_path, "x-vllm")
