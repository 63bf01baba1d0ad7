"""Graph pieces of the decoder: linears (MatMulNBits + LoRC, or float), RMSNorm, rotary, attention.

Shapes use B = batch, T = new tokens, P = past tokens, S = P + T, H = hidden size, nh / kvh =
query / key-value heads, hd = head dim. ``dt`` is the graph's float element type (fp32 or fp16);
norms and the softmax are computed in fp32 in both variants (as transformers does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .builder import MS_DOMAIN, GraphBuilder
from .pack import MnbWeights

__all__ = ["Dims", "MnbInits", "add_mnb_inits", "mnb_matmul", "float_linear", "lowrank_branch",
           "rms_norm", "rotary", "attention"]

FLOAT32_MIN = float(np.finfo(np.float32).min)
_NONE_U8 = np.empty(0, np.uint8)


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    dt: int                      # TensorProto.FLOAT or FLOAT16
    np_dt: type                  # np.float32 or np.float16


@dataclass(frozen=True)
class MnbInits:
    """Initializer names of one packed MatMulNBits weight (shared by lm_head and embeddings)."""

    B: str
    scales: str
    zero_points: str | None
    w: MnbWeights               # attributes only: its arrays are emptied once added


def add_mnb_inits(gb: GraphBuilder, prefix: str, w: MnbWeights) -> MnbInits:
    """Add ``prefix.qweight`` / ``.scales`` / ``.qzeros`` initializers for a packed weight."""
    zp = gb.initializer(f"{prefix}.qzeros", w.zero_points) if w.zero_points is not None else None
    B = gb.initializer(f"{prefix}.qweight", w.B)
    sc = gb.initializer(f"{prefix}.scales", w.scales)
    # keep the node's attributes, not its arrays (they are initializers now; export streams)
    meta = dataclasses.replace(w, B=_NONE_U8, scales=_NONE_U8, zero_points=None)
    return MnbInits(B=B, scales=sc, zero_points=zp, w=meta)


def mnb_matmul(gb: GraphBuilder, x: str, inits: MnbInits, name: str, accuracy_level: int) -> str:
    """``x [..., K] -> [..., N]`` through ``com.microsoft::MatMulNBits`` (no g_idx, ever)."""
    ins = [x, inits.B, inits.scales] + ([inits.zero_points] if inits.zero_points else [])
    return gb.op("MatMulNBits", ins, name=f"{name}/MatMulNBits", domain=MS_DOMAIN,
                 **inits.w.attrs(accuracy_level))


def float_linear(gb: GraphBuilder, x: str, W: np.ndarray, name: str, np_dt: type) -> str:
    """``x @ W^T`` for a float weight ``W [out, in]`` (stored transposed, ``[in, out]``)."""
    wt = gb.float_init(f"{name}.weight_t", W.T, np_dt)
    return gb.op("MatMul", [x, wt], name=f"{name}/MatMul")


def lowrank_branch(gb: GraphBuilder, x: str, A: np.ndarray, Bm: np.ndarray, name: str,
                   np_dt: type) -> str:
    """LoRC residual ``(x @ B^T) @ A^T`` for ``A [out, r]``, ``B [r, in]``."""
    bt = gb.float_init(f"{name}.lorc_b_t", Bm.T, np_dt)
    at = gb.float_init(f"{name}.lorc_a_t", A.T, np_dt)
    mid = gb.op("MatMul", [x, bt], name=f"{name}/lorc/MatMul_B")
    return gb.op("MatMul", [mid, at], name=f"{name}/lorc/MatMul_A")


def rms_norm(gb: GraphBuilder, x: str, weight: np.ndarray, name: str, d: Dims) -> str:
    """``weight * (x / sqrt(mean(x^2) + eps))``, the normalisation in fp32."""
    xf = gb.op("Cast", [x], name=f"{name}/CastUp", to=TensorProto.FLOAT) \
        if d.dt != TensorProto.FLOAT else x
    sq = gb.op("Mul", [xf, xf], name=f"{name}/Sq")
    var = gb.op("ReduceMean", [sq, gb.const([-1])], name=f"{name}/Mean", keepdims=1)
    den = gb.op("Sqrt", [gb.op("Add", [var, gb.const(d.eps, np.float32)], name=f"{name}/AddEps")],
                name=f"{name}/Sqrt")
    inv = gb.op("Reciprocal", [den], name=f"{name}/Rsqrt")
    y = gb.op("Mul", [xf, inv], name=f"{name}/Normalize")
    if d.dt != TensorProto.FLOAT:
        y = gb.op("Cast", [y], name=f"{name}/CastDown", to=d.dt)
    w = gb.float_init(f"{name}.weight", weight, d.np_dt)
    return gb.op("Mul", [y, w], name=f"{name}/Scale")


def rotary(gb: GraphBuilder, x: str, cos: str, sin: str, name: str, half: int) -> str:
    """``x * cos + rotate_half(x) * sin`` (Hugging Face convention) on ``x [B, h, T, hd]``;
    ``cos`` / ``sin`` are ``[B, 1, T, hd]``."""
    x1, x2 = gb.op("Split", [x, gb.const([half, half])], 2, name=f"{name}/Split", axis=-1)
    rot = gb.op("Concat", [gb.op("Neg", [x2], name=f"{name}/Neg"), x1], name=f"{name}/Concat",
                axis=-1)
    a = gb.op("Mul", [x, cos], name=f"{name}/MulCos")
    b = gb.op("Mul", [rot, sin], name=f"{name}/MulSin")
    return gb.op("Add", [a, b], name=f"{name}/Add")


def _heads(gb: GraphBuilder, x: str, n: int, hd: int, name: str) -> str:
    """``[B, T, n*hd] -> [B, n, T, hd]``."""
    r = gb.op("Reshape", [x, gb.const([0, 0, n, hd])], name=f"{name}/Reshape")
    return gb.op("Transpose", [r], name=f"{name}/Transpose", perm=[0, 2, 1, 3])


def attention(gb: GraphBuilder, q: str, k: str, v: str, past: tuple[str, str],
              present: tuple[str, str], rope: tuple[str, str], bias: str, name: str,
              d: Dims) -> str:
    """Grouped-query attention with KV cache.

    Args:
        q, k, v: projections ``[B, T, nh*hd]`` / ``[B, T, kvh*hd]``.
        past: graph inputs ``[B, kvh, P, hd]``; present: the output names for ``[B, kvh, S, hd]``.
        rope: (cos, sin) ``[B, 1, T, hd]``; bias: fp32 additive mask ``[B, 1, T, S]``.
    Returns ``[B, T, nh*hd]``. Query heads attend kv head ``h // (nh / kvh)`` (transformers'
    repeat_kv), done by folding the group into the query axis instead of copying K and V.
    """
    hd, nh, kvh = d.head_dim, d.heads, d.kv_heads
    qh = rotary(gb, _heads(gb, q, nh, hd, f"{name}/q"), *rope, f"{name}/q_rot", hd // 2)
    kh = rotary(gb, _heads(gb, k, kvh, hd, f"{name}/k"), *rope, f"{name}/k_rot", hd // 2)
    vh = _heads(gb, v, kvh, hd, f"{name}/v")
    kc = gb.op("Concat", [past[0], kh], name=f"{name}/k_cache", outputs=[present[0]], axis=2)
    vc = gb.op("Concat", [past[1], vh], name=f"{name}/v_cache", outputs=[present[1]], axis=2)
    qg = gb.op("Reshape", [qh, gb.const([0, kvh, -1, hd])], name=f"{name}/q_group")
    kt = gb.op("Transpose", [kc], name=f"{name}/k_t", perm=[0, 1, 3, 2])
    scores = gb.op("MatMul", [qg, kt], name=f"{name}/QK")                 # [B, kvh, g*T, S]
    scores = gb.op("Mul", [scores, gb.const(1.0 / np.sqrt(hd), d.np_dt)], name=f"{name}/Scale")
    if d.dt != TensorProto.FLOAT:
        scores = gb.op("Cast", [scores], name=f"{name}/ScoresUp", to=TensorProto.FLOAT)
    s4 = gb.op("Reshape", [scores, gb.const([0, nh, -1, 0])], name=f"{name}/per_head")
    probs = gb.op("Softmax", [gb.op("Add", [s4, bias], name=f"{name}/Mask")],
                  name=f"{name}/Softmax", axis=-1)
    if d.dt != TensorProto.FLOAT:
        probs = gb.op("Cast", [probs], name=f"{name}/ProbsDown", to=d.dt)
    pg = gb.op("Reshape", [probs, gb.const([0, kvh, -1, 0])], name=f"{name}/p_group")
    ctx = gb.op("MatMul", [pg, vc], name=f"{name}/PV")                    # [B, kvh, g*T, hd]
    ctx = gb.op("Reshape", [ctx, gb.const([0, nh, -1, hd])], name=f"{name}/ctx_heads")
    ctx = gb.op("Transpose", [ctx], name=f"{name}/ctx_t", perm=[0, 2, 1, 3])
    return gb.op("Reshape", [ctx, gb.const([0, 0, nh * hd])], name=f"{name}/ctx")
