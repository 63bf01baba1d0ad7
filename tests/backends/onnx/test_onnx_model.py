"""Whole decoders: exported graph in onnxruntime CPU vs transformers with the IR's weights."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnx
import pytest
from onnx_irutil import rtn_qmodel, rtn_qtensor

from qexport.backends.onnx import (OnnxDecoder, lower_onnx, mnb_spec, reference_logits,
                                   verify_onnx)
from qexport.errors import InputError, LoweringError, UnsupportedError, VerifyError
from qexport.grids import GridKind, GridSpec

CASES = [("tiny_llama", 4, 32, True), ("tiny_llama", 4, 128, False),
         ("tiny_qwen2", 4, 32, False), ("tiny_qwen2", 4, 128, True),
         ("tiny_ragged", 4, 128, False), ("tiny_ragged", 4, 32, True)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """Cache: (fixture name, bits, block, sym, extra) -> (QModel, folder)."""
    cache: dict = {}

    def get(fixture: str, bits: int, bs: int, sym: bool, **kw):
        key = (fixture, bits, bs, sym, tuple(sorted(kw.items())))
        if key not in cache:
            hf = request.getfixturevalue(fixture)
            lower_kw = {k: kw.pop(k) for k in ("dtype", "accuracy_level") if k in kw}
            model = rtn_qmodel(hf, mnb_spec(bits, bs, sym), **kw)
            out = tmp_path_factory.mktemp("onnx") / "model"
            cache[key] = (model, lower_onnx(model, out, **lower_kw))
        return cache[key]
    return get


@pytest.mark.parametrize("fixture,bits,bs,sym", CASES)
def test_logits_match_transformers(exported, fixture, bits, bs, sym):
    model, folder = exported(fixture, bits, bs, sym)
    dec = OnnxDecoder(folder / "model.onnx", "cpu")
    ids = [[1, 17, 300, 42, 999, 5, 77, 123, 8, 640, 2, 33]]
    got = dec.logits(ids)
    ref, _ = reference_logits(model, ids)
    assert got.shape == (1, 12, 1000)
    assert _rel(got, ref) < 1e-4
    nodes = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
    mnb = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(mnb) == 14 and all(len(n.input) == (3 if sym else 4) for n in mnb)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 0 for n in mnb)


def test_greedy_with_cache_equals_full_recompute(exported):
    _, folder = exported("tiny_qwen2", 4, 32, False)
    dec = OnnxDecoder(folder / "model.onnx", "cpu")
    prompt = [1, 317, 617, 260, 830]
    with_cache = dec.greedy(prompt, 16, use_cache=True)
    assert with_cache == dec.greedy(prompt, 16, use_cache=False)
    assert len(with_cache) == 16


def test_left_padded_batch_matches_single_sequences(exported):
    _, folder = exported("tiny_llama", 4, 32, True)
    dec = OnnxDecoder(folder / "model.onnx", "cpu")
    a, b = [1, 5, 9, 200, 31, 7], [1, 44, 3]
    ids = np.array([a, [0] * 3 + b], np.int64)
    mask = np.array([[1] * 6, [0] * 3 + [1] * 3], np.int64)
    got, _ = dec.run(ids, mask, dec.empty_past(2))
    assert _rel(got[0], dec.logits([a])[0]) < 1e-5
    assert _rel(got[1, 3:], dec.logits([b])[0]) < 1e-5


def test_verify_reports_bitexact_and_provider(exported):
    model, folder = exported("tiny_llama", 4, 128, False)
    rep = verify_onnx(folder, model, device="cpu")
    assert rep.ok and rep.provider == "CPUExecutionProvider"
    assert rep.tensors_bitexact == rep.tensors_checked == 14
    assert rep.max_rel_logit_diff < 1e-4 and rep.max_rel_cache_diff < 1e-4
    assert "CPUExecutionProvider" in rep.summary()
    man = json.loads((folder / "qexport_onnx.json").read_text())
    assert man["quantized"]["model.layers.0.mlp.down_proj.weight"]["spec"] == "mnb-int4-b128-asym"


def test_verify_catches_a_flipped_byte(exported, tmp_path):
    model, folder = exported("tiny_llama", 4, 32, True)
    proto = onnx.load(str(folder / "model.onnx"))
    init = next(t for t in proto.graph.initializer
                if t.name == "model.layers.1.mlp.up_proj.qweight")
    raw = bytearray(init.raw_data)
    raw[100] ^= 0x10
    init.raw_data = bytes(raw)
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx.save_model(proto, str(bad / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data")
    with pytest.raises(VerifyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: packed codes"):
        verify_onnx(bad, model, device="cpu")


def test_quantized_embeddings_lm_head_and_lorc(exported):
    model, folder = exported("tiny_llama", 4, 32, False, quant_embed=True, quant_head=True,
                             lorc_rank=4)
    assert model.tensors["model.embed_tokens.weight"].residual is not None
    rep = verify_onnx(folder, model, device="cpu")
    assert rep.ok and rep.tensors_checked == 16, rep.summary()
    ops = [n.op_type for n in onnx.load(str(folder / "model.onnx"),
                                        load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 15 and "Gemm" not in ops
    ids = [rep.sequences[0]]                 # the LoRC branches matter at this tolerance
    got = OnnxDecoder(folder / "model.onnx", "cpu").logits(ids)
    bare = dataclasses.replace(model, tensors={n: dataclasses.replace(qt, residual=None)
                                               for n, qt in model.tensors.items()})
    assert _rel(got, reference_logits(bare, ids)[0]) > 1e-3


def test_tied_quantized_embedding_shares_the_packed_table(exported):
    model, folder = exported("tiny_qwen2", 4, 32, True, quant_embed=True)
    rep = verify_onnx(folder, model, device="cpu")
    assert rep.ok, rep.summary()
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    names = [t.name for t in proto.graph.initializer]
    assert names.count("model.embed_tokens.qweight") == 1
    head = [n for n in proto.graph.node if n.op_type == "MatMulNBits"
            and n.input[1] == "model.embed_tokens.qweight"]
    assert len(head) == 1


@pytest.mark.parametrize("bits,bs", [(8, 64), (2, 16)])
def test_other_bit_widths(exported, bits, bs):
    model, folder = exported("tiny_llama", bits, bs, False)
    assert verify_onnx(folder, model, device="cpu").ok


@pytest.mark.slow
def test_stories260k_ragged_intermediate(stories260k, tmp_path):
    model = rtn_qmodel(stories260k, mnb_spec(4, 128, False))     # K = 64 and 172, both ragged
    folder = lower_onnx(model, tmp_path / "s")
    rep = verify_onnx(folder, model, device="cpu")
    assert rep.ok and rep.max_rel_logit_diff < 1e-4, rep.summary()


def test_fp16_graph_runs_on_cpu_within_fp16_noise(exported):
    model, folder = exported("tiny_llama", 4, 32, True, dtype="fp16")
    rep = verify_onnx(folder, model, device="cpu")
    assert rep.ok and rep.dtype == "fp16" and rep.max_rel_logit_diff < 1e-2, rep.summary()
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_accuracy_level_4_is_recorded_and_close(exported):
    model, folder = exported("tiny_llama", 4, 32, True, accuracy_level=4)
    rep = verify_onnx(folder, model, device="cpu")
    assert rep.accuracy_level == 4 and rep.ok and rep.max_rel_logit_diff > 1e-6


# ---- refusals --------------------------------------------------------------------------------
def test_refusals_leave_nothing_behind(tiny_llama, tmp_path):
    model = rtn_qmodel(tiny_llama, mnb_spec(4, 32, True))
    out = tmp_path / "o"
    lower_onnx(model, out)
    with pytest.raises(InputError, match="exists"):
        lower_onnx(model, out)
    model.passthrough["model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(LoweringError, match="model.extra.weight: IR tensor not used"):
        lower_onnx(model, tmp_path / "o2")
    del model.passthrough["model.extra.weight"]
    name = "model.layers.0.mlp.up_proj.weight"
    good = model.tensors[name]
    cb = GridSpec(name="cb4", kind=GridKind.CODEBOOK, bits=4, group_size=32, free_codebook=True)
    model.tensors[name] = rtn_qtensor(name, good.dequantize(), cb)
    with pytest.raises(UnsupportedError, match="up_proj.weight: spec cb4 is a codebook grid"):
        lower_onnx(model, tmp_path / "o3")
    model.tensors[name] = good
    model.passthrough["model.norm.weight"] = model.passthrough["model.norm.weight"] * 1e5
    with pytest.raises(LoweringError, match=r"model\.norm\.weight: expected \|values\| <= 65504"):
        lower_onnx(model, tmp_path / "o5", dtype="fp16")
    model.config = {**model.config, "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel"):
        lower_onnx(model, tmp_path / "o4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_mistral_sliding_window_matches_transformers(tiny_mistral, tmp_path):
    model = rtn_qmodel(tiny_mistral, mnb_spec(4, 64, False))
    model.config = {**model.config, "sliding_window": 5}
    rep = verify_onnx(lower_onnx(model, tmp_path / "m"), model, device="cpu")
    assert rep.ok and rep.max_rel_logit_diff < 1e-4, rep.summary()
    assert all(len(s) > 5 for s in rep.sequences)          # the window really cuts


def test_genai_config_names_match_graph(exported):
    _, folder = exported("tiny_llama", 4, 32, True)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ins, outs = {i.name for i in g.input}, {o.name for o in g.output}
    dec = cfg["decoder"]
    n = dec["num_hidden_layers"]
    assert {dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"]} <= ins
    assert {dec["inputs"]["past_key_names"] % i for i in range(n)} <= ins
    assert {dec["outputs"]["present_value_names"] % i for i in range(n)} <= outs
    assert len(ins) == 2 + 2 * n and dec["outputs"]["logits"] in outs
    assert cfg["type"] == "llama" and cfg["eos_token_id"] == [2] and cfg["vocab_size"] == 1000
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file()
    mask = os.umask(0)
    os.umask(mask)                              # modes as a plain mkdir/open would give
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (folder / "model.onnx.data").stat().st_mode & 0o777 == 0o666 & ~mask
