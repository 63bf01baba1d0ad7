"""Bounded memory (issue 7 item 5): the quantize path writes every finished tensor to disk at
once and keeps none of them; a streamed IR is byte-identical to one saved from memory; lazy IR
loading; source readers do not keep read pages mapped."""
from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qexport.errors import IRError
from qexport.grids import GridKind, GridSpec, ZeroDomain, fit_minmax, quantize_nearest
from qexport.ir import LowRank, QModel, QTensor
from qexport.irio import load_ir, save_ir
from qexport.irstream import IRStreamWriter, LazyTensors, StagedTensor
from qexport.stfile import ST_DTYPES, header_bytes

Q4K = GridSpec(name="t-q4k", kind=GridKind.SUPERBLOCK, bits=4, group_size=32,
               zero=ZeroDomain.FLOAT, super_size=256, sub_scale_range=(0, 63),
               sub_min_range=(0, 63), row_multiple=256, ragged=False)
NU = GridSpec(name="t-nu3", kind=GridKind.CODEBOOK, bits=3, group_size=-1, free_codebook=True)
GPTQ = {"method": "gptq", "target": "ir", "bits": 4, "group_size": 32, "sym": True,
        "n_samples": 4, "seq_len": 32, "lorc_rank": 2, "quiet": True}


def _qt(name: str, spec: GridSpec, W: np.ndarray) -> QTensor:
    g = fit_minmax(spec, W)
    return QTensor(name, quantize_nearest(spec, g, W, span=W.shape[1]), g, spec)


def _model(rng: np.random.Generator) -> QModel:
    W = rng.standard_normal((16, 512)).astype(np.float32)
    qts = [_qt("l.0.a.weight", GridSpec.affine(4, 128, True), W[:, :200]),
           _qt("l.0.b.weight", GridSpec.affine(3, 64, False), W),
           _qt("l.1.c.weight", Q4K, W), _qt("l.1.d.weight", NU, W)]
    qts[1].residual = LowRank(np.float16(rng.standard_normal((16, 2))).astype(np.float32),
                              np.float16(rng.standard_normal((2, 512))).astype(np.float32))
    qts[2].stats = {"objective": 0.25, "damp": [0.01, 0.1]}
    return QModel(config={"architectures": ["LlamaForCausalLM"], "hidden_size": 512},
                  tensors={q.name: q for q in qts},
                  passthrough={"norm.weight": rng.standard_normal(512).astype(np.float32),
                               "emb.weight": rng.standard_normal((7, 3)).astype(np.float32)},
                  tokenizer={"tokenizer.json": b"{}"}, recipe={"name": "t"},
                  provenance={"method": "rtn"})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_header_matches_safetensors_library(tmp_path: Path, rng: np.random.Generator) -> None:
    from safetensors.numpy import save_file
    arrays = {}
    for i, dt in enumerate(ST_DTYPES):
        for name in (f"q/{dt}/b", f"q/{dt}/B", f"p/{dt}", f"q/{dt}/a.x", f"z{i}"):
            shape = (int(rng.integers(0, 4)), int(rng.integers(1, 5)))
            arrays[name] = (rng.standard_normal(shape) * 9).astype(dt)
    save_file(arrays, str(tmp_path / "lib.st"), metadata={"format": "qexport-ir"})
    head, order = header_bytes({k: (ST_DTYPES[str(v.dtype)], v.shape, v.nbytes)
                                for k, v in arrays.items()}, {"format": "qexport-ir"})
    ours = head + b"".join(arrays[k].tobytes() for k in order)
    assert ours == (tmp_path / "lib.st").read_bytes()


def test_streamed_ir_is_byte_identical(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    save_ir(m, tmp_path / "mem.qir")
    w = IRStreamWriter(tmp_path / "s.qir")
    for name in sorted(m.tensors, reverse=True):           # order of arrival does not matter
        assert isinstance(w.add(m.tensors[name]), StagedTensor)
    for name, arr in m.passthrough.items():
        w.add_passthrough(name, arr)
    qm = w.model(config=m.config, tokenizer=m.tokenizer, recipe=m.recipe,
                 provenance=m.provenance)
    stage = w.backing.stage
    assert stage is not None and stage.parent == tmp_path and stage.name.startswith(".s.qir.")
    save_ir(qm, tmp_path / "s.qir")
    assert _files(tmp_path / "s.qir") == _files(tmp_path / "mem.qir")
    assert not stage.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mem.qir",
                                                                                  "s.qir"]
    for name, qt in m.tensors.items():                     # now read back from s.qir
        np.testing.assert_array_equal(qm.tensors[name].dequantize(), qt.dequantize())
    assert qm.bits_summary() == m.bits_summary()


def test_writer_refuses_bad_tensors(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    w = IRStreamWriter(tmp_path / "s.qir")
    bad = m.tensors["l.0.b.weight"]
    bad.codes[0, 0] = 200                                  # out of range for 3 bits
    with pytest.raises(IRError, match=r"l\.0\.b\.weight\.codes"):
        w.add(bad)
    w.add(m.tensors["l.1.c.weight"])
    with pytest.raises(IRError, match="written twice"):
        w.add(m.tensors["l.1.c.weight"])
    with pytest.raises(IRError, match="float32"):
        w.add_passthrough("x", np.zeros(3, np.float16))
    w.discard()
    assert list(tmp_path.iterdir()) == []


def test_lazy_load_ir(tmp_path: Path, rng: np.random.Generator) -> None:
    m = _model(rng)
    save_ir(m, tmp_path / "a")
    lz = load_ir(tmp_path / "a", lazy=True)
    assert isinstance(lz.tensors, LazyTensors) and set(lz.tensors) == set(m.tensors)
    for name, qt in m.tensors.items():
        np.testing.assert_array_equal(lz.tensors[name].codes, qt.codes)
        np.testing.assert_array_equal(lz.tensors[name].dequantize(), qt.dequantize())
    np.testing.assert_array_equal(lz.passthrough["norm.weight"], m.passthrough["norm.weight"])
    save_ir(lz, tmp_path / "b")                            # copied without loading: same bytes
    assert _files(tmp_path / "b") == _files(tmp_path / "a")
    tf = tmp_path / "b" / "tensors.safetensors"            # lz reads from its last save
    tf.write_bytes(tf.read_bytes()[:-8])                   # changed under the lazy model
    with pytest.raises(IRError, match="changed or removed"):
        lz.tensors["l.0.a.weight"]
    with pytest.raises(IRError, match="tensors.safetensors"):
        load_ir(tmp_path / "b", lazy=True)                 # validated on load like eager


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """Tiny random Llama with many layers (hidden 64, ffn 128, 6 layers)."""
    from qexport.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("deep"), "llama", hidden=64,
                           intermediate=128, layers=6, heads=2, kv_heads=1,
                           tokenizer_dir=tokenizer_dir)


def test_quantize_retains_no_qtensor(deep_llama: Path, calib_file: Path, tmp_path: Path,
                                     monkeypatch) -> None:
    """GPTQ through the CLI's path (checkpoint + streaming): every QTensor / passthrough array
    handed to the writer is garbage once written, both when the next one arrives and after
    the run (weak references); the checkpoint reads each layer's stand-ins back."""
    from qexport.checkpoint import Checkpoint
    from qexport.commands import build_ir
    refs: list[weakref.ref] = []
    alive_at_add: list[int] = []
    real_add, real_pass = IRStreamWriter.add, IRStreamWriter.add_passthrough

    def add(self, qt):
        alive_at_add.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(qt))
        return real_add(self, qt)

    def add_passthrough(self, name, arr):
        refs.append(weakref.ref(arr))
        return real_pass(self, name, arr)
    monkeypatch.setattr(IRStreamWriter, "add", add)
    monkeypatch.setattr(IRStreamWriter, "add_passthrough", add_passthrough)
    out = tmp_path / "s.qir"
    ck = Checkpoint(out)
    qm = build_ir(str(deep_llama), {**GPTQ, "lorc_rank": 0, "calib": str(calib_file)}, ck)
    assert ck.layers_done() == 6
    gc.collect()
    from qexport.model.load import load_model
    assert len(refs) == len(load_model(deep_llama).tensor_names())
    assert alive_at_add == [0] * len(alive_at_add), "earlier QTensors still referenced"
    assert [r for r in refs if r() is not None] == [], "tensors retained after the run"
    assert isinstance(qm.tensors, LazyTensors)
    save_ir(qm, out)
    ck.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.qir"]
    assert len(load_ir(out).tensors) == 6 * 7           # decoder linears (embeddings fp32)


def test_streamed_quantize_matches_in_memory(deep_llama: Path, tmp_path: Path) -> None:
    """The same RTN + LoRC run streamed and held in memory gives the same IR bytes."""
    from qexport.commands import build_ir
    kw = {**GPTQ, "method": "rtn"}
    qm = build_ir(str(deep_llama), kw, stream_to=tmp_path / "s.qir")
    assert isinstance(qm.tensors, LazyTensors)
    save_ir(qm, tmp_path / "s.qir")
    mem = build_ir(str(deep_llama), kw)
    assert isinstance(mem.tensors, dict)
    save_ir(mem, tmp_path / "mem.qir")
    assert _files(tmp_path / "s.qir") == _files(tmp_path / "mem.qir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.qir", "s.qir"]


def test_failed_run_leaves_no_staging(deep_llama: Path, calib_file: Path, tmp_path: Path,
                                      monkeypatch) -> None:
    import errno

    from qexport.cli import main
    real_add, calls = IRStreamWriter.add, []

    def failing_add(self, qt):
        calls.append(qt.name)
        if len(calls) == 20:                               # in layer 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, qt)
    monkeypatch.setattr(IRStreamWriter, "add", failing_add)
    out = tmp_path / "m.qir"
    args = ["quantize", str(deep_llama), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--n-samples", "8", "--seq-len", "64", "--calib", str(calib_file), "-o", str(out),
            "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "disk full" in res.output, res.output
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["m.qir.partial"], left              # finished layers kept for --resume only


def _mapped_rss_kib(path: Path) -> int | None:
    """Resident KiB of this process's mappings of ``path`` (None: file not mapped)."""
    total, hit, cur = 0, False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:        # a mapping's header line
                cur = len(parts) >= 6 and parts[5] == str(path)
                hit |= cur
            elif cur and parts[0] == "Rss:":
                total += int(parts[1])
    return total if hit else None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_safetensors_source_keeps_nothing_mapped(deep_llama: Path, tmp_path: Path) -> None:
    """Once the arrays read are dropped, nothing of the file stays mapped (an open handle
    would keep every page it ever read resident)."""
    import shutil

    from qexport.model.load import load_model
    folder = Path(shutil.copytree(deep_llama, tmp_path / "m")).resolve()
    src = load_model(folder)
    kept = src.get("model.layers.5.mlp.down_proj.weight")
    for name in src.tensor_names():
        src.get(name)
    gc.collect()
    size_kib = (folder / "model.safetensors").stat().st_size // 1024       # ~1400
    assert (_mapped_rss_kib(folder / "model.safetensors") or 0) < size_kib / 4   # kept only
    del kept
    gc.collect()
    assert _mapped_rss_kib(folder / "model.safetensors") is None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_gguf_source_releases_read_pages() -> None:
    from qexport.errors import InputError
    from qexport.model.load import load_model, sample_path
    try:
        path = sample_path("smollm2").resolve()
    except InputError as e:
        pytest.skip(str(e))
    src = load_model("sample:smollm2")
    for name in src.tensor_names()[:40]:                   # embeddings + 4 layers: ~40 MiB
        src.get(name)
    assert (_mapped_rss_kib(path) or 0) < 1024
