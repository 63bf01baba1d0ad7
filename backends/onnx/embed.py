"""Token embeddings: a float ``Gather``, or rows of a quantized table decoded with standard ops.

A quantized embedding reuses the MatMulNBits initializers (``B [V, k_blocks, blob]``, scales,
packed zero points) so a tied, quantized lm_head and the embedding share one copy. Rows are
gathered, unpacked with integer ``Div``/``Mod`` (both EPs implement them for int32) and decoded
as ``scale * (q - zp)`` in fp32, exactly the IR's value; the fp16 graph then casts once.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .blocks import Dims, MnbInits
from .builder import GraphBuilder

__all__ = ["float_embedding", "quantized_embedding", "embedding_residual"]


def float_embedding(gb: GraphBuilder, ids: str, table: str, name: str) -> str:
    """``table [V, H]`` initializer name, ``ids [B, T]`` -> ``[B, T, H]``."""
    return gb.op("Gather", [table, ids], name=f"{name}/Gather", axis=0)


def _unpack(gb: GraphBuilder, packed: str, bits: int, name: str) -> str:
    """uint8 ``[..., n]`` -> int32 ``[..., n, 8 // bits]`` codes, low bits first."""
    xi = gb.op("Cast", [packed], name=f"{name}/CastI32", to=TensorProto.INT32)
    parts = []
    for i in range(8 // bits):
        shifted = gb.op("Div", [xi, gb.const(2 ** (i * bits), np.int32)], name=f"{name}/Shr{i}")
        code = gb.op("Mod", [shifted, gb.const(2 ** bits, np.int32)], name=f"{name}/Mask{i}")
        parts.append(gb.op("Unsqueeze", [code, gb.const([-1])], name=f"{name}/Unsq{i}"))
    return gb.op("Concat", parts, name=f"{name}/Stack", axis=-1)


def quantized_embedding(gb: GraphBuilder, ids: str, inits: MnbInits, name: str, d: Dims) -> str:
    """Decode rows ``ids [B, T]`` of a packed ``[V, K]`` table -> ``[B, T, K]`` (graph dtype)."""
    w = inits.w
    kb, bs, bits = w.k_blocks, w.fmt.block_size, w.fmt.bits
    rows = gb.op("Gather", [inits.B, ids], name=f"{name}/GatherRows", axis=0)  # [B,T,kb,blob]
    q = gb.op("Reshape", [_unpack(gb, rows, bits, f"{name}/codes"), gb.const([0, 0, kb, bs])],
              name=f"{name}/codes/Reshape")                                   # [B,T,kb,bs]
    if inits.zero_points is None:
        z = gb.const(w.fmt.implicit_zero, np.int32)
    else:
        zrows = gb.op("Gather", [inits.zero_points, ids], name=f"{name}/GatherZp", axis=0)
        zz = gb.op("Reshape", [_unpack(gb, zrows, bits, f"{name}/zp"), gb.const([0, 0, -1])],
                   name=f"{name}/zp/Reshape")
        zz = gb.op("Slice", [zz, gb.const([0]), gb.const([kb]), gb.const([2])],
                   name=f"{name}/zp/Slice")
        z = gb.op("Unsqueeze", [zz, gb.const([-1])], name=f"{name}/zp/Unsq")
    diff = gb.op("Cast", [gb.op("Sub", [q, z], name=f"{name}/SubZp")], name=f"{name}/CastF",
                 to=TensorProto.FLOAT)
    s = gb.op("Gather", [inits.scales, ids], name=f"{name}/GatherScales", axis=0)  # [B,T,kb]
    if d.dt != TensorProto.FLOAT:
        s = gb.op("Cast", [s], name=f"{name}/ScalesUp", to=TensorProto.FLOAT)
    s = gb.op("Unsqueeze", [s, gb.const([-1])], name=f"{name}/ScalesUnsq")
    x = gb.op("Mul", [s, diff], name=f"{name}/Dequant")
    x = gb.op("Reshape", [x, gb.const([0, 0, kb * bs])], name=f"{name}/Flat")
    x = gb.op("Slice", [x, gb.const([0]), gb.const([w.K]), gb.const([2])], name=f"{name}/Crop")
    if d.dt != TensorProto.FLOAT:
        x = gb.op("Cast", [x], name=f"{name}/CastDown", to=d.dt)
    return x


def embedding_residual(gb: GraphBuilder, ids: str, A: np.ndarray, Bm: np.ndarray, name: str,
                       d: Dims) -> str:
    """LoRC residual rows of an embedding: ``A[ids] @ B`` for ``A [V, r]``, ``B [r, H]``."""
    a = gb.float_init(f"{name}.lorc_a", A, d.np_dt)
    b = gb.float_init(f"{name}.lorc_b", Bm, d.np_dt)
    rows = gb.op("Gather", [a, ids], name=f"{name}/lorc/Gather", axis=0)
    return gb.op("MatMul", [rows, b], name=f"{name}/lorc/MatMul")
