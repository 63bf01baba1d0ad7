"""Whole-model GGUF lowering: names, RoPE permutation, writer, reader, verify, LoRA adapter.
Oracles: gguf-py (GGUFReader, gguf.quants.dequantize), sentencepiece, transformers' RoPE."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from qexport.backends.gguf.lora import lower_gguf_lora
from qexport.backends.gguf.names import (gguf_to_hf, hf_to_gguf, permute_rows, rope_heads,
                                         unpermute_rows)
from qexport.backends.gguf.reader import read_gguf_summary, read_gguf_tokenizer
from qexport.backends.gguf.types import spec_for
from qexport.backends.gguf.verify import verify_gguf
from qexport.backends.gguf.writer import lower_gguf
from qexport.errors import InputError, LoweringError, UnsupportedError
from qexport.grids import GridSpec, dequantize, fit_minmax, quantize_nearest
from qexport.ir import LowRank, QModel, QTensor

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS"]


def build_ir(folder: Path, type_name: str | None, *, embed: bool = False,
             recipe: str | None = None) -> QModel:
    """RTN IR of an HF folder: every layer linear on ``type_name`` (None: all float)."""
    cfg = json.loads((folder / "config.json").read_text())
    m = QModel(config=cfg, recipe={"name": recipe} if recipe else {})
    spec = spec_for(type_name) if type_name else None
    for k, v in load_file(folder / "model.safetensors").items():
        v = v.astype(np.float32)
        if spec is not None and v.ndim == 2 and ("layers" in k or embed):
            g = fit_minmax(spec, v)
            m.tensors[k] = QTensor(k, quantize_nearest(spec, g, v, 0), g, spec)
        else:
            m.passthrough[k] = v
    m.tokenizer = {f.name: f.read_bytes() for f in folder.iterdir()
                   if f.name.startswith("tokenizer")}
    m.validate()
    return m


def _reader_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


# ---- names and permutation -----------------------------------------------------------------
def test_names_round_trip() -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for p in ("input_layernorm.weight", "post_attention_layernorm.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
              "self_attn.v_proj.bias", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight"):
        names.append(f"model.layers.17.{p}")
    gnames = [hf_to_gguf(n) for n in names]
    assert len(set(gnames)) == len(names)
    assert [gguf_to_hf(g) for g in gnames] == names
    assert hf_to_gguf("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert hf_to_gguf("model.layers.0.self_attn.q_proj.bias") == "blk.0.attn_q.bias"
    with pytest.raises(UnsupportedError, match="rotary_emb"):
        hf_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq")
    with pytest.raises(UnsupportedError):
        gguf_to_hf("blk.0.attn_qkv.weight")


def test_permutation_definition_and_inverse(rng: np.random.Generator) -> None:
    n_head, hd = 3, 8
    w = rng.normal(size=(n_head * hd, 5)).astype(np.float32)
    p = permute_rows(w, n_head)
    for h in range(n_head):                    # interleave the two halves of each head
        for j in range(hd // 2):
            np.testing.assert_array_equal(p[h * hd + 2 * j], w[h * hd + j])
            np.testing.assert_array_equal(p[h * hd + 2 * j + 1], w[h * hd + hd // 2 + j])
    np.testing.assert_array_equal(unpermute_rows(p, n_head), w)
    b = rng.normal(size=n_head * hd).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(b, n_head), n_head), b)
    cfg = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4,
           "num_key_value_heads": 2}
    assert rope_heads("model.layers.0.self_attn.q_proj.weight", cfg) == 4
    assert rope_heads("model.layers.0.self_attn.k_proj.bias", cfg) == 2
    assert rope_heads("model.layers.0.self_attn.v_proj.weight", cfg) is None
    assert rope_heads("model.layers.0.self_attn.q_proj.weight",
                      {**cfg, "architectures": ["Qwen2ForCausalLM"]}) is None


@pytest.mark.parametrize("type_name", ["Q4_K", "Q3_K", "IQ4_NL", "Q4_1"])
def test_permuting_codes_and_grid_is_exact(rng: np.random.Generator, type_name: str) -> None:
    spec = spec_for(type_name)
    w = rng.normal(size=(64, 256)).astype(np.float32)
    g = fit_minmax(spec, w)
    codes = quantize_nearest(spec, g, w, 0)
    pg = type(g)(**{k: permute_rows(v, 4) for k, v in g.arrays().items()})
    np.testing.assert_array_equal(dequantize(permute_rows(codes, 4), pg, spec),
                                  permute_rows(dequantize(codes, g, spec), 4))


# ---- writer + verify, every type -----------------------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_lower_each_type_verifies(tiny_llama: Path, tmp_path: Path, type_name: str) -> None:
    m = build_ir(tiny_llama, type_name, embed=type_name == "Q8_0")
    out = lower_gguf(m, tmp_path / "m.gguf")
    ts = _reader_tensors(out)
    assert ts["blk.1.ffn_down.weight"].tensor_type.name == type_name
    assert ts["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    # independent check of one permuted tensor with gguf-py alone
    q = ts["blk.0.attn_q.weight"]
    deq = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).reshape(256, 256)
    np.testing.assert_array_equal(unpermute_rows(deq, 4),
                                  m.tensors["model.layers.0.self_attn.q_proj.weight"].dequantize())
    rep = verify_gguf(out, m)
    assert rep.ok, rep.failures()
    assert len(rep.rows) == len(m.tensors) + len(m.passthrough)


def test_metadata_and_spm_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    import sentencepiece as spm
    m = build_ir(tiny_llama, "Q4_K", recipe="Q4_K_M")
    out = lower_gguf(m, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()
         if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores")}
    assert f["general.architecture"] == "llama" and f["general.alignment"] == 32
    assert f["general.file_type"] == 15 and f["general.quantization_version"] == 2
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"],
            f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.context_length"]) == \
        (2, 256, 512, 4, 2, 64, 512)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    sp = spm.SentencePieceProcessor(model_file=str(tiny_llama / "tokenizer.model"))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert toks == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores = r.fields["tokenizer.ggml.scores"].contents()
    assert np.allclose(scores, [sp.get_score(i) for i in range(sp.vocab_size())])
    assert f["tokenizer.ggml.token_type"][0] == gguf.TokenType.UNKNOWN
    assert f["tokenizer.ggml.bos_token_id"] == sp.bos_id()
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    assert "output.weight" in _reader_tensors(out)


def test_qwen2_tied_biases_not_permuted(tiny_qwen2: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_qwen2, "Q6_K")
    out = lower_gguf(m, tmp_path / "q.gguf")
    ts = _reader_tensors(out)
    assert "output.weight" not in ts                                 # tied embeddings
    bias = np.asarray(ts["blk.0.attn_q.bias"].data)
    np.testing.assert_array_equal(bias, m.passthrough["model.layers.0.self_attn.q_proj.bias"])
    meta = read_gguf_summary(out)[1]
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.block_count"] == 2
    assert verify_gguf(out, m).ok


def test_mistral_is_llama_arch(tiny_mistral: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_mistral, "Q5_K")
    out = lower_gguf(m, tmp_path / "m.gguf")
    assert read_gguf_summary(out)[1]["general.architecture"] == "llama"
    assert verify_gguf(out, m).ok


def test_float_ir_writes_f16_only_when_exact(tiny_llama: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_llama, None)
    emb = m.passthrough["model.embed_tokens.weight"]
    m.passthrough["model.embed_tokens.weight"] = emb.astype(np.float16).astype(np.float32)
    out = lower_gguf(m, tmp_path / "f.gguf")
    ts = _reader_tensors(out)
    assert ts["token_embd.weight"].tensor_type.name == "F16"
    assert ts["output.weight"].tensor_type.name == "F32"             # not fp16-exact
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 1
    assert verify_gguf(out, m).ok


# ---- failures ------------------------------------------------------------------------------
def test_corrupt_byte_fails_verify(tiny_llama: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_llama, "Q4_K")
    out = lower_gguf(m, tmp_path / "m.gguf")
    t = _reader_tensors(out)["blk.1.ffn_up.weight"]
    data = bytearray(out.read_bytes())
    data[int(t.data_offset) + 100] ^= 0x10                          # one code nibble
    out.write_bytes(bytes(data))
    rep = verify_gguf(out, m)
    assert not rep.ok
    bad = [r for r in rep.rows if not r.equal]
    assert [r.gguf_name for r in bad] == ["blk.1.ffn_up.weight"]
    assert "gguf-py decoder differs" in bad[0].note and bad[0].max_abs_diff > 0


def test_verify_detects_metadata_and_missing(tiny_llama: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_llama, "Q8_0")
    out = lower_gguf(m, tmp_path / "m.gguf")
    m2 = build_ir(tiny_llama, "Q8_0")
    m2.config = {**m2.config, "intermediate_size": 1024}
    m2.passthrough["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    rep = verify_gguf(out, m2)
    assert not rep.ok
    text = " | ".join(rep.failures())
    assert "feed_forward_length" in text and "missing from file" in text


def test_non_gguf_spec_is_refused_atomically(tiny_llama: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_llama, "Q4_0")
    spec = GridSpec.affine(4, 128, sym=True)
    w = m.tensors["model.layers.1.mlp.up_proj.weight"].dequantize()
    g = fit_minmax(spec, w)
    name = "model.layers.1.mlp.up_proj.weight"
    m.tensors[name] = QTensor(name, quantize_nearest(spec, g, w, 0), g, spec)
    with pytest.raises(LoweringError) as e:
        lower_gguf(m, tmp_path / "x.gguf")
    assert name in str(e.value) and "gguf-q4_k" in str(e.value)
    assert list(tmp_path.iterdir()) == []                            # nothing left behind


def test_existing_output_needs_force(tiny_llama: Path, tmp_path: Path) -> None:
    m = build_ir(tiny_llama, "Q8_0")
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(InputError, match="--force"):
        lower_gguf(m, tmp_path / "m.gguf")
    lower_gguf(m, tmp_path / "m.gguf", force=True)
    assert verify_gguf(tmp_path / "m.gguf", m).ok


def test_reader_refuses_corrupt_files(tiny_llama: Path, tmp_path: Path) -> None:
    out = lower_gguf(build_ir(tiny_llama, "Q4_K"), tmp_path / "m.gguf")
    rows, meta = read_gguf_summary(out)
    q = next(r for r in rows if r.name == "blk.0.attn_q.weight")
    assert (q.type, q.shape, q.bpw) == ("Q4_K", (256, 256), 4.5)
    assert meta["tokenizer.ggml.tokens"] == "[1000 x STRING]"
    data = out.read_bytes()
    cases = {"trunc.gguf": data[: len(data) - 1000], "head.gguf": data[:200],
             "junk.gguf": b"NOTAGGUF" * 10, "tiny.gguf": b"GG",
             "counts.gguf": data[:8] + (10 ** 9).to_bytes(8, "little") + data[16:]}
    for fname, blob in cases.items():
        (tmp_path / fname).write_bytes(blob)
        with pytest.raises(InputError) as e:
            read_gguf_summary(tmp_path / fname)
        assert fname in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="no such"):
        read_gguf_summary(tmp_path / "absent.gguf")


def _loader_tokenizer_json(path: Path) -> bytes:
    """gguf_tokenizer.json as the model loader (qexport.model.gguf_source) writes it."""
    gs = pytest.importorskip("qexport.model.gguf_source")
    return json.dumps(gs.gguf_tokenizer_metadata(gguf.GGUFReader(str(path)))).encode()


@pytest.mark.parametrize("producer", ["reader", "model_loader"])
def test_gguf_tokenizer_written_back_verbatim(tiny_llama: Path, tmp_path: Path,
                                              producer: str) -> None:
    m = build_ir(tiny_llama, "Q4_0")
    first = lower_gguf(m, tmp_path / "a.gguf")
    blob = read_gguf_tokenizer(first) if producer == "reader" else _loader_tokenizer_json(first)
    m.tokenizer = {"gguf_tokenizer.json": blob, "tokenizer.json": b"{}"}
    second = lower_gguf(m, tmp_path / "b.gguf")
    fa, fb = gguf.GGUFReader(str(first)).fields, gguf.GGUFReader(str(second)).fields
    keys = sorted(k for k in fa if k.startswith("tokenizer."))
    assert keys == sorted(k for k in fb if k.startswith("tokenizer.")) and len(keys) >= 8
    for k in keys:
        assert list(fa[k].types) == list(fb[k].types), k
        assert fa[k].contents() == fb[k].contents(), k


def test_bpe_tokenizer_json(tiny_llama: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def main(): return 42\n" * 3, "import os, sys\n"] * 20, trainer)
    m = build_ir(tiny_llama, "Q8_0")
    m.tokenizer = {"tokenizer.json": tok.to_str().encode()}
    m.config = {**m.config, "vocab_size": tok.get_vocab_size(), "bos_token_id": 0,
                "eos_token_id": 0}
    m.passthrough["model.embed_tokens.weight"] = \
        m.passthrough["model.embed_tokens.weight"][: tok.get_vocab_size()].copy()
    m.passthrough["lm_head.weight"] = m.passthrough["lm_head.weight"][: tok.get_vocab_size()].copy()
    out = lower_gguf(m, tmp_path / "b.gguf")
    f = gguf.GGUFReader(str(out)).fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
    toks = f["tokenizer.ggml.tokens"].contents()
    assert toks == [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    assert f["tokenizer.ggml.token_type"].contents()[0] == gguf.TokenType.CONTROL
    merges = json.loads(tok.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"].contents() == [" ".join(x) if isinstance(x, list) else x
                                                     for x in merges]
    assert verify_gguf(out, m).ok
    tj = json.loads(tok.to_str())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [tj["pre_tokenizer"]]}
    m.tokenizer = {"tokenizer.json": json.dumps(tj).encode()}
    with pytest.raises(UnsupportedError, match="bpe_pre"):
        lower_gguf(m, tmp_path / "c.gguf")
    lower_gguf(m, tmp_path / "c.gguf", bpe_pre="llama-bpe")


def test_llama3_rope_freqs_match_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    m = build_ir(tiny_llama, "Q8_0")
    rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    m.config = {**m.config, "rope_parameters": rp}
    out = lower_gguf(m, tmp_path / "r.gguf")
    got = np.asarray(_reader_tensors(out)["rope_freqs.weight"].data)
    cfg = {k: v for k, v in m.config.items() if k != "model_type"}
    inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**cfg), torch.device("cpu"))
    inv = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    np.testing.assert_allclose(got, (inv / inv_scaled).numpy(), rtol=1e-5)


# ---- LoRA adapter --------------------------------------------------------------------------
def test_lora_adapter_layout(tiny_llama: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    m = build_ir(tiny_llama, "Q4_0")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        out_f, in_f = m.tensors[name].shape
        A = rng.normal(size=(out_f, 4)).astype(np.float16).astype(np.float32)
        B = rng.normal(size=(4, in_f)).astype(np.float16).astype(np.float32)
        m.tensors[name].residual = LowRank(A, B, "fp16")
    out = lower_gguf_lora(m, tmp_path / "a.gguf")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert (f["general.type"], f["adapter.type"], f["adapter.lora.alpha"]) == \
        ("adapter", "lora", 4.0)
    assert f["general.architecture"] == "llama"
    ts = {t.name: t for t in r.tensors}
    a, b = ts["blk.0.attn_q.weight.lora_a"], ts["blk.0.attn_q.weight.lora_b"]
    assert list(a.shape) == [256, 4] and list(b.shape) == [4, 256]    # ne: a [in, r], b [r, out]
    assert a.tensor_type.name == "F16"
    res = m.tensors["model.layers.0.self_attn.q_proj.weight"].residual
    np.testing.assert_array_equal(np.asarray(a.data).astype(np.float32), res.B)
    np.testing.assert_array_equal(np.asarray(b.data).astype(np.float32),
                                  permute_rows(res.A, 4))
    d = m.tensors["model.layers.1.mlp.down_proj.weight"].residual
    np.testing.assert_array_equal(
        np.asarray(ts["blk.1.ffn_down.weight.lora_b"].data).astype(np.float32), d.A)
    base = lower_gguf(m, tmp_path / "base.gguf")       # base holds the residual-free value
    assert verify_gguf(base, m).ok
    m.tensors["model.layers.0.self_attn.q_proj.weight"].residual = None
    m.tensors["model.layers.1.mlp.down_proj.weight"].residual = None
    with pytest.raises(LoweringError, match="no LoRC residuals"):
        lower_gguf_lora(m, tmp_path / "b.gguf")
