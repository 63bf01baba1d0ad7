"""IR folder format: lossless round trip, strict manifest, atomic writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qexport.errors import InputError, IRError
from qexport.grids import GridKind, GridSpec, ZeroDomain, fit_minmax, quantize_nearest
from qexport.ir import LowRank, QModel, QTensor
from qexport.irio import load_ir, save_ir

Q4K = GridSpec(name="test-q4k", kind=GridKind.SUPERBLOCK, bits=4, group_size=32,
               zero=ZeroDomain.FLOAT, super_size=256, sub_scale_range=(0, 63),
               sub_min_range=(0, 63), row_multiple=256, ragged=False)
NL = GridSpec(name="test-iq4nl", kind=GridKind.CODEBOOK, bits=4, group_size=32,
              table=(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113))
NU = GridSpec(name="test-nu3", kind=GridKind.CODEBOOK, bits=3, group_size=-1, free_codebook=True)


def _qt(name: str, spec: GridSpec, W: np.ndarray) -> QTensor:
    g = fit_minmax(spec, W)
    return QTensor(name, quantize_nearest(spec, g, W, span=W.shape[1]), g, spec)


def _model(rng: np.random.Generator) -> QModel:
    W = rng.standard_normal((16, 512)).astype(np.float32)
    qts = [_qt("a.weight", GridSpec.affine(4, 128, True), W[:, :200]),
           _qt("b.weight", GridSpec.affine(3, 64, False), W),
           _qt("c.weight", Q4K, W), _qt("d.weight", NL, W), _qt("e.weight", NU, W)]
    qts[1].residual = LowRank(np.float16(rng.standard_normal((16, 2))).astype(np.float32),
                              np.float16(rng.standard_normal((2, 512))).astype(np.float32))
    return QModel(config={"architectures": ["LlamaForCausalLM"], "hidden_size": 512},
                  tensors={q.name: q for q in qts},
                  passthrough={"norm.weight": rng.standard_normal(512).astype(np.float32)},
                  tokenizer={"tokenizer.json": b"{}"}, recipe={"name": "test"},
                  provenance={"method": "rtn"})


def test_roundtrip_is_lossless(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    save_ir(m, tmp_path / "m.qir")
    back = load_ir(tmp_path / "m.qir")
    assert set(back.tensors) == set(m.tensors)
    for n, qt in m.tensors.items():
        b = back.tensors[n]
        assert b.spec == qt.spec
        np.testing.assert_array_equal(b.codes, qt.codes)
        for k, v in qt.grid.arrays().items():
            np.testing.assert_array_equal(b.grid.arrays()[k], v)
        np.testing.assert_array_equal(b.dequantize(), qt.dequantize())
    np.testing.assert_array_equal(back.passthrough["norm.weight"], m.passthrough["norm.weight"])
    assert back.tokenizer == m.tokenizer and back.recipe == m.recipe


def test_save_is_deterministic(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    save_ir(m, tmp_path / "a")
    save_ir(m, tmp_path / "b")
    for f in ("manifest.json", "tensors.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_existing_output_refused_without_force(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    save_ir(m, tmp_path / "m")
    with pytest.raises(InputError, match="exists"):
        save_ir(m, tmp_path / "m")
    save_ir(m, tmp_path / "m", force=True)


def test_failed_save_leaves_nothing(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    m.tensors["b.weight"].codes[0, 0] = 200          # out of range for 3 bits
    with pytest.raises(IRError, match=r"b\.weight\.codes"):
        save_ir(m, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def _edit_manifest(path: Path, fn) -> None:
    mf = path / "manifest.json"
    man = json.loads(mf.read_text())
    fn(man)
    mf.write_text(json.dumps(man))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(extra=1), "unknown keys"),
    (lambda m: m.update(ir_version=99), "ir_version expected 1"),
    (lambda m: m["tensors"]["c.weight"].update(colour="red"), r"c\.weight: unknown keys"),
    (lambda m: m["tensors"]["c.weight"].update(shape=[16, 256]), r"c\.weight\.codes: expected shape"),
    (lambda m: m["tensors"]["a.weight"].update(spec="nope"), r"a\.weight\.spec"),
    (lambda m: m["specs"]["test-q4k"].update(sub_scale_range=[0, 3]), r"c\.weight\.sc"),
    (lambda m: m["passthrough"].pop("norm.weight"), "not in the manifest"),
    (lambda m: m["specs"]["test-q4k"].update(colour=1), "unknown keys"),
])
def test_manifest_is_strict(tmp_path: Path, rng: np.random.Generator, edit, match) -> None:
    save_ir(_model(rng), tmp_path / "m")
    _edit_manifest(tmp_path / "m", edit)
    with pytest.raises(IRError, match=match):
        load_ir(tmp_path / "m")


def test_truncated_tensors_file(tmp_path: Path, rng: np.random.Generator) -> None:
    save_ir(_model(rng), tmp_path / "m")
    tf = tmp_path / "m" / "tensors.safetensors"
    tf.write_bytes(tf.read_bytes()[:-100])
    with pytest.raises(IRError, match="tensors.safetensors"):
        load_ir(tmp_path / "m")


def test_not_an_ir(tmp_path: Path) -> None:
    with pytest.raises(IRError, match="no manifest.json"):
        load_ir(tmp_path)


def test_bits_per_weight_counts_everything(rng: np.random.Generator) -> None:
    m = _model(rng)
    b = m.tensors["b.weight"]                       # 3-bit g64 asym + rank-2 fp16 residual
    n = b.codes.size
    expect = 3 + (16 * 8 * 16 + 16 * 8 * 3) / n + 2 * (16 + 512) * 16 / n
    assert b.bits_per_weight() == pytest.approx(expect)
    c = m.tensors["c.weight"]                       # Q4_K-like: 4.5 bits per weight
    assert c.bits_per_weight() == pytest.approx(4.5)
