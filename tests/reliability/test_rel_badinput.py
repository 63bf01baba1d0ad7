"""Bad input: each case ends with exactly one `error:` line on stderr, exit code 2, no
traceback, and nothing written (the working folder is byte-identical afterwards)."""
from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from clihelp import GPTQ_FAST, RTN_FAST, assert_clean_failure, run_cli, snapshot


@pytest.fixture
def model_copy(micro_llama: Path, tmp_path: Path) -> Path:
    """A private copy of the micro Llama folder, to damage."""
    return Path(shutil.copytree(micro_llama, tmp_path / "model"))


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, micro_llama: Path) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    res = run_cli("convert", micro_llama, "--to", "gguf", "--type", "Q8_0", "--method", "rtn",
                  "--quiet", "-o", out)
    assert res.exit_code == 0, res.stderr
    return out


def _fails(tmp_path: Path, *args, needles=()) -> str:
    before = snapshot(tmp_path)
    res = run_cli(*args)
    return assert_clean_failure(res, tmp_path, before, *needles)


def _quantize_and_inspect_fail(tmp_path: Path, bad: Path, *needles: str) -> None:
    _fails(tmp_path, "inspect", bad, needles=needles)
    _fails(tmp_path, "quantize", bad, *RTN_FAST, "-o", tmp_path / "out.qir", needles=needles)


# ------------------------------------------------------------------ source models

def test_truncated_safetensors(model_copy: Path, tmp_path: Path) -> None:
    st = model_copy / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    _fails(tmp_path, "quantize", model_copy, *RTN_FAST, "-o", tmp_path / "o.qir",
           needles=["model.safetensors"])
    st.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])       # header length lies
    _fails(tmp_path, "quantize", model_copy, *RTN_FAST, "-o", tmp_path / "o.qir",
           needles=["model.safetensors"])


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_config_missing_field(model_copy: Path, tmp_path: Path) -> None:
    _edit_config(model_copy, hidden_size=None)
    _fails(tmp_path, "quantize", model_copy, *RTN_FAST, "-o", tmp_path / "o.qir",
           needles=["hidden_size"])


@pytest.mark.parametrize("changes,needle", [
    ({"num_attention_heads": 3, "head_dim": None}, "head"),        # 64 not divisible by 3
    ({"num_key_value_heads": 3}, "key_value"),                   # 2 heads, 3 kv heads
    ({"vocab_size": 999}, "shape"),                               # embedding has 1000 rows
    ({"intermediate_size": 96}, "shape"),                         # ffn weights are 128 wide
], ids=["heads", "kv-heads", "vocab", "ffn"])
def test_config_inconsistent_fields(model_copy: Path, tmp_path: Path, changes, needle) -> None:
    _edit_config(model_copy, **changes)
    _fails(tmp_path, "quantize", model_copy, *RTN_FAST, "-o", tmp_path / "o.qir",
           needles=[needle])


def test_unsupported_architecture(model_copy: Path, tmp_path: Path) -> None:
    _edit_config(model_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _fails(tmp_path, "quantize", model_copy, *RTN_FAST, "-o", tmp_path / "o.qir",
           needles=["GPT2LMHeadModel"])


def _poison(folder: Path, value: float) -> str:
    from safetensors.numpy import load_file, save_file
    st = folder / "model.safetensors"
    arrays = load_file(str(st))
    name = "model.layers.1.mlp.up_proj.weight"
    arrays[name] = arrays[name].copy()
    arrays[name][3, 5] = value
    save_file(arrays, str(st), metadata={"format": "pt"})
    return name


def test_nan_weights(model_copy: Path, tmp_path: Path, calib_file: Path) -> None:
    name = _poison(model_copy, np.nan)
    _fails(tmp_path, "quantize", model_copy, *RTN_FAST, "-o", tmp_path / "o.qir",
           needles=[name, "nan"])
    _fails(tmp_path, "quantize", model_copy, *GPTQ_FAST, "--calib", calib_file,
           "-o", tmp_path / "o.qir", needles=[name])


def test_inf_weights(model_copy: Path, tmp_path: Path) -> None:
    name = _poison(model_copy, -np.inf)
    _fails(tmp_path, "convert", model_copy, "--to", "gguf", "--type", "Q4_0", "--method", "rtn",
           "--quiet", "-o", tmp_path / "o.gguf", needles=[name])


# ------------------------------------------------------------------ calibration

def test_empty_calibration_text(micro_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    _fails(tmp_path, "quantize", micro_llama, *GPTQ_FAST, "--calib", tmp_path / "empty.txt",
           "-o", tmp_path / "o.qir", needles=["empty.txt", "0 tokens"])


def test_too_short_calibration_text(micro_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("def f(x): return x\n")
    _fails(tmp_path, "quantize", micro_llama, *GPTQ_FAST, "--calib", tmp_path / "short.txt",
           "-o", tmp_path / "o.qir", needles=["short.txt", "need at least 64"])


def test_singular_hessian_after_retries(micro_llama: Path, tmp_path: Path, calib_file: Path,
                                        monkeypatch) -> None:
    from qexport.methods import hessian
    monkeypatch.setattr(hessian, "_factor", lambda H, damp, dtype: None)   # never factorable
    line = _fails(tmp_path, "quantize", micro_llama, *GPTQ_FAST, "--calib", calib_file,
                  "-o", tmp_path / "o.qir",
                  needles=["model.layers.0.self_attn.q_proj.weight", "cholesky", "percdamp"])
    assert "1.0" in line, line                       # the largest damp tried is named


# ------------------------------------------------------------------ GGUF inputs

def test_corrupt_gguf_magic(good_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + good_gguf.read_bytes()[4:])
    _quantize_and_inspect_fail(tmp_path, bad, "bad.gguf")


def _header_field_pos(data: bytes, key: bytes) -> int:
    """Offset just after a metadata key string (its value type follows)."""
    return data.index(key) + len(key)


def test_gguf_lying_sizes(good_gguf: Path, tmp_path: Path) -> None:
    data = good_gguf.read_bytes()
    cases = []
    d = bytearray(data)
    d[16:24] = struct.pack("<Q", 1 << 40)                            # n_kv
    cases.append(d)
    d = bytearray(data)
    d[8:16] = struct.pack("<Q", 1 << 50)                             # n_tensors
    cases.append(d)
    d = bytearray(data)                                              # string length
    p = _header_field_pos(data, b"general.architecture") + 4
    d[p:p + 8] = struct.pack("<Q", 1 << 60)
    cases.append(d)
    d = bytearray(data)                                              # array count
    p = _header_field_pos(data, b"tokenizer.ggml.tokens") + 8
    d[p:p + 8] = struct.pack("<Q", (1 << 64) - 1)
    cases.append(d)
    d = bytearray(data)                                              # a tensor dimension
    p = _header_field_pos(data, b"token_embd.weight") + 4
    d[p:p + 8] = struct.pack("<Q", 1 << 40)
    cases.append(d)
    for i, d in enumerate(cases):
        bad = tmp_path / f"lying{i}.gguf"
        bad.write_bytes(bytes(d))
        _quantize_and_inspect_fail(tmp_path, bad, f"lying{i}.gguf")


def test_gguf_out_of_range_offset(good_gguf: Path, tmp_path: Path) -> None:
    data = good_gguf.read_bytes()
    p = _header_field_pos(data, b"output_norm.weight")
    n_dims = struct.unpack_from("<I", data, p)[0]
    off = p + 4 + 8 * n_dims + 4                                      # dims, type, offset
    d = bytearray(data)
    d[off:off + 8] = struct.pack("<Q", len(data) * 4)
    bad = tmp_path / "far.gguf"
    bad.write_bytes(bytes(d))
    _quantize_and_inspect_fail(tmp_path, bad, "output_norm.weight")


def test_gguf_duplicate_names(good_gguf: Path, tmp_path: Path) -> None:
    data = good_gguf.read_bytes()
    assert data.count(b"blk.0.attn_k.weight") == 1
    bad = tmp_path / "dup.gguf"
    bad.write_bytes(data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"))
    _quantize_and_inspect_fail(tmp_path, bad, "blk.0.attn_q.weight", "duplicate")


# ------------------------------------------------------------------ IR and outputs

@pytest.fixture(scope="module")
def good_ir(tmp_path_factory, micro_llama: Path) -> Path:
    out = tmp_path_factory.mktemp("ir") / "m.qir"
    assert run_cli("quantize", micro_llama, *RTN_FAST, "-o", out).exit_code == 0
    return out


def test_corrupt_ir(good_ir: Path, tmp_path: Path) -> None:
    ir = Path(shutil.copytree(good_ir, tmp_path / "c.qir"))
    tf = ir / "tensors.safetensors"
    full = tf.read_bytes()
    tf.write_bytes(full[: len(full) // 3])
    for cmd in (["export", ir, "--to", "gguf", "-o", tmp_path / "o.gguf"], ["inspect", ir],
                ["report", ir, "-o", tmp_path / "rep"]):
        _fails(tmp_path, *cmd, needles=["tensors.safetensors"])
    tf.write_bytes(full)
    (ir / "manifest.json").write_text((good_ir / "manifest.json").read_text()[:-40])
    _fails(tmp_path, "export", ir, "--to", "onnx", "-o", tmp_path / "o", needles=["manifest"])
    man = json.loads((good_ir / "manifest.json").read_text())
    name = sorted(man["tensors"])[0]
    man["tensors"][name]["residual"] = 7
    (ir / "manifest.json").write_text(json.dumps(man))
    _fails(tmp_path, "inspect", ir, needles=[name])


def test_full_disk_enospc(micro_llama: Path, good_ir: Path, tmp_path: Path,
                          monkeypatch) -> None:
    def full(arrays, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr("qexport.irio.save_file", full)
    out = tmp_path / "o.qir"
    _fails(tmp_path, "quantize", micro_llama, *RTN_FAST, "-o", out,
           needles=[f"disk full while writing {out}"])
    import gguf

    def full_gguf(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_gguf)
    out = tmp_path / "o.gguf"
    _fails(tmp_path, "export", good_ir, "--to", "gguf", "-o", out,
           needles=[f"disk full while writing {out}"])


def test_output_exists_without_force(micro_llama: Path, tmp_path: Path, calib_file: Path,
                                     monkeypatch) -> None:
    out = tmp_path / "o.qir"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    called = []
    monkeypatch.setattr("qexport.calib.load_calibration",
                        lambda *a, **k: called.append(1) or (_ for _ in ()).throw(AssertionError))
    _fails(tmp_path, "quantize", micro_llama, *GPTQ_FAST, "--calib", calib_file, "-o", out,
           needles=[str(out), "--force"])
    assert called == [], "quantized before checking the output path"
    (tmp_path / "o.gguf").write_bytes(b"x")
    _fails(tmp_path, "convert", micro_llama, "--to", "gguf", "--type", "Q8_0", "--method", "rtn",
           "-o", tmp_path / "o.gguf", needles=["exists"])
