"""Property-based fuzzing (hypothesis) of the GGUF reader, the IR reader and `qexport inspect`:
every mutated input ends in a clean QExportError (or a correct result), never another
exception or a hang. Bounded: a fixed number of derandomized examples per property."""
from __future__ import annotations

import json
import os
import shutil
import struct
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from clihelp import RTN_FAST, run_cli

from qexport.errors import QExportError

pytestmark = pytest.mark.fuzz
# QEXPORT_FUZZ_EXAMPLES=2000 QEXPORT_FUZZ_RANDOM=1 for a deeper local run
FUZZ = settings(max_examples=int(os.environ.get("QEXPORT_FUZZ_EXAMPLES", "120")), deadline=5000,
                derandomize=not os.environ.get("QEXPORT_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 4096, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
               1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _tb(res) -> str:
    """The traceback of an in-process CLI run that raised."""
    return "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""


def _write_model_gguf(path: Path) -> None:
    """A complete 1-layer Llama GGUF (hidden 32, ffn 64, vocab 16): F32, F16 and Q8_0 tensors,
    string / int / float metadata and a string array."""
    import gguf
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                 ("attention.head_count", 2), ("attention.head_count_kv", 1),
                 ("context_length", 64)):
        getattr(w, "add_uint32")(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(16)])
    w.add_array("tokenizer.ggml.scores", [0.0] * 16)

    def q8(shape):
        from gguf.quants import quantize
        return quantize(rng.standard_normal(shape).astype(np.float32),
                        gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(32, np.float32))
    for name, shape in (("attn_q", (32, 32)), ("attn_k", (16, 32)), ("attn_v", (16, 32)),
                        ("attn_output", (32, 32)), ("ffn_gate", (64, 32)), ("ffn_up", (64, 32)),
                        ("ffn_down", (32, 64))):
        w.add_tensor(f"blk.0.{name}.weight", q8(shape),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fz") / "base.gguf"
    _write_model_gguf(p)
    from qexport.model.load import load_model
    src = load_model(p)                       # the unmutated file is a readable model
    assert len(src.tensor_names()) == 11
    assert src.get("model.layers.0.mlp.down_proj.weight").shape == (32, 64)
    return p.read_bytes()


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Byte flips (mostly in the header), a truncation, or an interesting integer written over
    a header field."""
    d = bytearray(data)
    header = min(len(d), 900)
    kind = draw(st.sampled_from(["flip", "truncate", "int", "mixed"]))
    if kind in ("flip", "mixed"):
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, header - 1) | st.integers(0, len(d) - 1))
            d[i] ^= draw(st.integers(1, 255))
    if kind in ("int", "mixed"):
        pos = draw(st.integers(4, header - 8))
        fmt = draw(st.sampled_from(["<Q", "<I"]))
        val = draw(st.sampled_from(INTERESTING + [len(d), len(d) + 1]))
        val &= (1 << (8 * struct.calcsize(fmt))) - 1
        struct.pack_into(fmt, d, pos, val)
    if kind == "truncate":
        d = d[:draw(st.integers(0, len(d) - 1))]
    return bytes(d)


def _read_all_tensors(path: Path) -> None:
    from qexport.model.load import load_model
    src = load_model(path)
    for n in src.tensor_names():
        src.get(n)


def _read_everything(path: Path) -> None:
    from qexport.backends.gguf.reader import read_gguf_summary
    for fn in (lambda: read_gguf_summary(path), lambda: _read_all_tensors(path)):
        try:
            fn()
        except QExportError:
            pass


@given(data=st.data())
@FUZZ
def test_fuzz_gguf_reader(gguf_bytes: bytes, tmp_path: Path, data) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(data.draw(mutated(gguf_bytes)))
    _read_everything(p)


@given(data=st.data())
@FUZZ
def test_fuzz_inspect_gguf(gguf_bytes: bytes, tmp_path: Path, data) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(data.draw(mutated(gguf_bytes)))
    res = run_cli("inspect", p, "--json")
    assert res.exit_code in (0, 2), res.exception
    assert res.exception is None or isinstance(res.exception, SystemExit), _tb(res)
    if res.exit_code == 0:
        json.loads(res.stdout)
    else:
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr


# ------------------------------------------------------------------ IR folders

@pytest.fixture(scope="module")
def small_ir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    from qexport.testing import make_tiny_model
    root = tmp_path_factory.mktemp("fzir")
    m = make_tiny_model(root / "m", "llama", hidden=32, intermediate=64, layers=1, heads=2,
                        kv_heads=1, tokenizer_dir=tokenizer_dir)
    out = root / "m.qir"
    assert run_cli("quantize", m, *RTN_FAST, "--lorc-rank", "2", "-o", out).exit_code == 0
    return out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2 ** 40) | st.floats(allow_nan=True)
    | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
    | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_manifest(draw, man: dict):
    man = json.loads(json.dumps(man))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(man) if p]
        path = draw(st.sampled_from(paths))
        parent = man
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return man


def _load_or_clean_error(ir: Path) -> None:
    from qexport.irio import load_ir
    try:
        load_ir(ir)
    except QExportError:
        pass


@given(data=st.data())
@FUZZ
def test_fuzz_ir_manifest(small_ir: Path, tmp_path: Path, data) -> None:
    ir = tmp_path / "x.qir"
    if not ir.exists():
        shutil.copytree(small_ir, ir)
    man = json.loads((small_ir / "manifest.json").read_text())
    (ir / "manifest.json").write_text(json.dumps(data.draw(mutated_manifest(man))))
    _load_or_clean_error(ir)
    res = run_cli("inspect", ir)
    assert res.exception is None or isinstance(res.exception, SystemExit), _tb(res)
    assert res.exit_code in (0, 2)


@given(data=st.data())
@FUZZ
def test_fuzz_ir_tensors(small_ir: Path, tmp_path: Path, data) -> None:
    ir = tmp_path / "x.qir"
    if not ir.exists():
        shutil.copytree(small_ir, ir)
    raw = (small_ir / "tensors.safetensors").read_bytes()
    (ir / "tensors.safetensors").write_bytes(data.draw(mutated(raw)))
    _load_or_clean_error(ir)
