"""The decoder graph of a Llama / Mistral / Qwen2 QModel: standard ONNX ops + MatMulNBits.

Graph I/O (the optimum / onnxruntime-genai names; genai.py writes the matching config):

| name                            | dtype       | shape (B batch, T new, P past, S = P + T) |
|---------------------------------|-------------|-------------------------------------------|
| ``input_ids``                   | int64       | ``[B, T]``                                |
| ``attention_mask``              | int64       | ``[B, S]``                                |
| ``past_key_values.N.key/value`` | graph dtype | ``[B, kv_heads, P, head_dim]``            |
| ``logits`` (output)             | float32     | ``[B, T, vocab]``                         |
| ``present.N.key/value`` (out)   | graph dtype | ``[B, kv_heads, S, head_dim]``            |

Positions come from the mask (``cumsum(attention_mask) - 1``, so left padding works), the mask
is causal (bottom-right aligned with the past) and, when the config has one, sliding-window.
Every quantized linear is one MatMulNBits (plus a LoRC ``MatMul(MatMul(x, B^T), A^T)`` branch
when the QTensor has a residual); float linears are MatMul; the float lm_head is a Gemm with
``transB=1`` so a tied head shares the embedding initializer.
"""
from __future__ import annotations

from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto

from qexport.errors import LoweringError
from qexport.ir import QModel, QTensor

from .arch import DecoderConfig, decoder_config, rope_cache
from .blocks import (Dims, MnbInits, add_mnb_inits, attention, float_linear, lowrank_branch,
                     mnb_matmul, rms_norm)
from .builder import GraphBuilder
from .embed import embedding_residual, float_embedding, quantized_embedding
from .pack import pack_qtensor

__all__ = ["build_decoder", "GRAPH_ELEM"]

GRAPH_ELEM = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}
EMBED, LM_HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


class _Weights:
    """The QModel's tensors by name, recording which ones the graph consumed."""

    def __init__(self, model: QModel, dtype: str, accuracy_level: int, d: Dims):
        self.m, self.dtype, self.acc, self.d = model, dtype, accuracy_level, d
        self.used: set[str] = set()
        self.packed: dict[str, MnbInits] = {}

    def has(self, name: str) -> bool:
        return name in self.m.tensors or name in self.m.passthrough

    def is_quant(self, name: str) -> bool:
        return name in self.m.tensors

    def float(self, name: str) -> np.ndarray:
        if name in self.m.tensors:
            raise LoweringError(f"{name}: expected a float (passthrough) tensor, found quantized")
        if name not in self.m.passthrough:
            raise LoweringError(f"{name}: missing from the IR (expected a float32 tensor)")
        self.used.add(name)
        return self.m.passthrough[name]

    def mnb(self, gb: GraphBuilder, name: str, qt: QTensor | None = None) -> MnbInits:
        """The packed initializers of ``name`` (``qt``: the QTensor if already read)."""
        if name not in self.packed:
            w = pack_qtensor(qt if qt is not None else self.m.tensors[name], self.dtype)
            self.packed[name] = add_mnb_inits(gb, name.removesuffix(".weight"), w)
            self.used.add(name)
        return self.packed[name]

    def linear(self, gb: GraphBuilder, x: str, prefix: str,
               shape: tuple[int, int] | None = None) -> str:
        """``prefix.weight`` (+ ``prefix.bias``) applied to ``x [..., in] -> [..., out]``;
        ``shape`` is the ``[out, in]`` the config implies."""
        wname = f"{prefix}.weight"
        if not self.has(wname):
            raise LoweringError(f"{wname}: missing from the IR")
        # read once (a lazy IR reads each access from disk)
        qt = self.m.tensors[wname] if self.is_quant(wname) else None
        w = self.float(wname) if qt is None else None
        got = qt.shape if qt is not None else tuple(w.shape)
        if shape is not None and tuple(got) != shape:
            raise LoweringError(f"{wname}: expected shape {list(shape)} from the config "
                                f"(not {list(got)})")
        if qt is not None:
            y = mnb_matmul(gb, x, self.mnb(gb, wname, qt), prefix, self.acc)
            if qt.residual is not None:
                r = lowrank_branch(gb, x, qt.residual.A, qt.residual.B, prefix, self.d.np_dt)
                y = gb.op("Add", [y, r], name=f"{prefix}/lorc/Add")
        else:
            y = float_linear(gb, x, w, prefix, self.d.np_dt)
        if self.has(f"{prefix}.bias"):
            b = gb.float_init(f"{prefix}.bias", self.float(f"{prefix}.bias"), self.d.np_dt)
            y = gb.op("Add", [y, b], name=f"{prefix}/AddBias")
        return y


def _positions_and_mask(gb: GraphBuilder, dc: DecoderConfig, d: Dims) -> tuple[str, str, str]:
    """Returns (cos, sin) ``[B, 1, T, hd]`` and the fp32 additive mask ``[B, 1, T, S]``."""
    ids, mask = "input_ids", "attention_mask"
    T = gb.op("Gather", [gb.op("Shape", [ids], name="ids_shape"), gb.const(1)], name="seq_len")
    S = gb.op("Gather", [gb.op("Shape", [mask], name="mask_shape"), gb.const(1)],
              name="total_len")
    P = gb.op("Sub", [S, T], name="past_len")
    pos_all = gb.op("Sub", [gb.op("CumSum", [mask, gb.const(1)], name="mask_cumsum"),
                            gb.const(1)], name="pos_all")
    pos_all = gb.op("Max", [pos_all, gb.const(0)], name="pos_clip")
    pos = gb.op("Slice", [pos_all, gb.op("Unsqueeze", [gb.op("Neg", [T], name="neg_T"),
                                                       gb.const([0])], name="start"),
                          gb.const([np.iinfo(np.int64).max]), gb.const([1])], name="position_ids")
    cos_np, sin_np = rope_cache(dc)
    rope = []
    for nm, arr in (("cos", cos_np), ("sin", sin_np)):
        cache = gb.float_init(f"rotary.{nm}_cache", arr, d.np_dt)
        g = gb.op("Gather", [cache, pos], name=f"rotary/{nm}", axis=0)          # [B,T,hd]
        rope.append(gb.op("Unsqueeze", [g, gb.const([1])], name=f"rotary/{nm}_unsq"))
    qpos = gb.op("Add", [gb.op("Range", [gb.const(0), T, gb.const(1)], name="q_range"), P],
                 name="q_abs")
    kpos = gb.op("Range", [gb.const(0), S, gb.const(1)], name="k_range")
    qcol = gb.op("Unsqueeze", [qpos, gb.const([1])], name="q_col")              # [T,1]
    allowed = gb.op("LessOrEqual", [kpos, qcol], name="causal")                 # [T,S]
    if dc.sliding_window is not None:
        dist = gb.op("Sub", [qcol, kpos], name="distance")
        inwin = gb.op("Less", [dist, gb.const(dc.sliding_window)], name="in_window")
        allowed = gb.op("And", [allowed, inwin], name="causal_window")
    keep = gb.op("Cast", [mask], name="mask_bool", to=TensorProto.BOOL)         # [B,S]
    keep = gb.op("Unsqueeze", [keep, gb.const([1, 2])], name="mask_4d")       # [B,1,1,S]
    allowed = gb.op("And", [allowed, keep], name="allowed")                    # [B,1,T,S]
    bias = gb.op("Where", [allowed, gb.const(0.0, np.float32),
                           gb.const(float(np.finfo(np.float32).min), np.float32)],
                 name="attn_bias")
    return rope[0], rope[1], bias


def _embed(gb: GraphBuilder, W: _Weights, d: Dims, vocab: int) -> tuple[str, str | None]:
    """Returns the hidden states ``[B, T, H]`` and the float table name (for a tied head)."""
    if W.is_quant(EMBED):
        if W.m.tensors[EMBED].shape != (vocab, d.hidden):
            raise LoweringError(f"{EMBED}: expected shape {[vocab, d.hidden]} "
                                f"(not {list(W.m.tensors[EMBED].shape)})")
        x = quantized_embedding(gb, "input_ids", W.mnb(gb, EMBED), "embed_tokens", d)
        res = W.m.tensors[EMBED].residual
        if res is not None:
            r = embedding_residual(gb, "input_ids", res.A, res.B, "model.embed_tokens", d)
            x = gb.op("Add", [x, r], name="embed_tokens/lorc/Add")
        return x, None
    emb = W.float(EMBED)
    if emb.shape != (vocab, d.hidden):
        raise LoweringError(f"{EMBED}: expected shape {[vocab, d.hidden]} (not {list(emb.shape)})")
    table = gb.float_init("model.embed_tokens.weight", emb, d.np_dt)
    return float_embedding(gb, "input_ids", table, "embed_tokens"), table


def _lm_head(gb: GraphBuilder, W: _Weights, x: str, table: str | None, dc: DecoderConfig,
             d: Dims) -> str:
    head = LM_HEAD if W.has(LM_HEAD) or not dc.tie else EMBED
    if W.is_quant(head):
        return W.linear(gb, x, head.removesuffix(".weight"), (dc.vocab, dc.hidden))
    if head == LM_HEAD:
        head_w = W.float(LM_HEAD)
        if head_w.shape != (dc.vocab, dc.hidden):
            raise LoweringError(f"{LM_HEAD}: expected shape {[dc.vocab, dc.hidden]} "
                                f"(not {list(head_w.shape)})")
        table = gb.float_init("lm_head.weight", head_w, d.np_dt)
    x2 = gb.op("Reshape", [x, gb.const([-1, dc.hidden])], name="lm_head/Flatten")
    y = gb.op("Gemm", [x2, table], name="lm_head/Gemm", transB=1)
    shape = gb.op("Concat", [gb.op("Slice", [gb.op("Shape", [x], name="lm_head/Shape"),
                                             gb.const([0]), gb.const([2])], name="lm_head/BT"),
                             gb.const([dc.vocab])], name="lm_head/OutShape", axis=0)
    return gb.op("Reshape", [y, shape], name="lm_head/Unflatten")


def _layer(gb: GraphBuilder, W: _Weights, h: str, i: int, rope: tuple[str, str], bias: str,
           d: Dims, inter: int) -> str:
    p = f"model.layers.{i}"
    x = rms_norm(gb, h, W.float(f"{p}.input_layernorm.weight"), f"{p}.input_layernorm", d)
    H, I, qd, kd = d.hidden, inter, d.heads * d.head_dim, d.kv_heads * d.head_dim
    q, k, v = (W.linear(gb, x, f"{p}.self_attn.{n}_proj", (od, H))
               for n, od in (("q", qd), ("k", kd), ("v", kd)))
    ctx = attention(gb, q, k, v, (f"past_key_values.{i}.key", f"past_key_values.{i}.value"),
                    (f"present.{i}.key", f"present.{i}.value"), rope, bias, f"{p}.self_attn", d)
    o = W.linear(gb, ctx, f"{p}.self_attn.o_proj", (H, qd))
    h = gb.op("Add", [h, o], name=f"{p}/attn_residual")
    x = rms_norm(gb, h, W.float(f"{p}.post_attention_layernorm.weight"),
                 f"{p}.post_attention_layernorm", d)
    g = W.linear(gb, x, f"{p}.mlp.gate_proj", (I, H))
    u = W.linear(gb, x, f"{p}.mlp.up_proj", (I, H))
    act = gb.op("Mul", [g, gb.op("Sigmoid", [g], name=f"{p}.mlp/Sigmoid")], name=f"{p}.mlp/SiLU")
    a = gb.op("Mul", [act, u], name=f"{p}.mlp/Gate")
    down = W.linear(gb, a, f"{p}.mlp.down_proj", (H, I))
    return gb.op("Add", [h, down], name=f"{p}/mlp_residual")


def build_decoder(model: QModel, dtype: str = "fp32", accuracy_level: int = 0,
                  external: tuple[BinaryIO, str] | None = None) -> onnx.ModelProto:
    """Build the decoder ModelProto. Initializers stay in memory, or with ``external`` (an open
    data file, its name beside model.onnx) large ones are written there as they are made.

    Raises UnsupportedError / LoweringError naming the tensor or config field that cannot be
    lowered exactly, and LoweringError for IR tensors the graph would not use.
    """
    if dtype not in GRAPH_ELEM:
        raise LoweringError(f"dtype: expected one of {sorted(GRAPH_ELEM)} (not {dtype!r})")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LoweringError(f"accuracy_level: expected 0..4 (not {accuracy_level})")
    dc = decoder_config(model.config)
    elem, np_dt = GRAPH_ELEM[dtype]
    d = Dims(dc.hidden, dc.heads, dc.kv_heads, dc.head_dim, dc.eps, elem, np_dt)
    gb = GraphBuilder(external)
    gb.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    gb.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    kv_shape = ["batch_size", dc.kv_heads, "past_sequence_length", dc.head_dim]
    for i in range(dc.layers):
        gb.input(f"past_key_values.{i}.key", elem, kv_shape)
        gb.input(f"past_key_values.{i}.value", elem, kv_shape)
    W = _Weights(model, dtype, accuracy_level, d)
    cos, sin, bias = _positions_and_mask(gb, dc, d)
    h, table = _embed(gb, W, d, dc.vocab)
    for i in range(dc.layers):
        h = _layer(gb, W, h, i, (cos, sin), bias, d, dc.intermediate)
    h = rms_norm(gb, h, W.float(NORM), "model.norm", d)
    logits = _lm_head(gb, W, h, table, dc, d)
    if elem != TensorProto.FLOAT:
        logits = gb.op("Cast", [logits], name="logits/Cast", to=TensorProto.FLOAT)
    gb.op("Identity", [logits], name="logits", outputs=["logits"])
    gb.output("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", dc.vocab])
    kv_out = ["batch_size", dc.kv_heads, "total_sequence_length", dc.head_dim]
    for i in range(dc.layers):
        gb.output(f"present.{i}.key", elem, kv_out)
        gb.output(f"present.{i}.value", elem, kv_out)
    unused = sorted((set(model.tensors) | set(model.passthrough)) - W.used)
    if unused:
        raise LoweringError(f"{unused[0]}: IR tensor not used by the {dc.arch} graph "
                            f"({len(unused)} unused in all); expected only the decoder's weights")
    meta = {"qexport.arch": dc.arch, "qexport.dtype": dtype,
            "qexport.accuracy_level": str(accuracy_level),
            "qexport.min_onnxruntime": _min_ort(W)}
    return gb.model(metadata=meta)


def _min_ort(W: _Weights) -> str:
    from .specs import MNB_MIN_ORT
    vers = [MNB_MIN_ORT[p.w.fmt.bits] for p in W.packed.values()] or ["1.20"]
    return max(vers, key=lambda v: tuple(int(x) for x in v.split(".")))
