"""Short numpy reference decoder of GGUF blocks, written from the layout table, not the packer.

Each type is described per *element*: for element ``i`` of a block, which byte and bit offset
hold each part of its code (``_FIELDS``), so decoding is one gather per field. Sub-block
parameters are read the same way. ``unpack_tensor`` returns the IR (codes + grid) so that
``verify`` can compare codes and grid parameters exactly; ``dequantize_raw`` then applies
``qexport.grids.dequantize`` (the IR's defining formula).
"""
from __future__ import annotations

import numpy as np

from qexport.errors import VerifyError
from qexport.grids import AffineGrid, CodebookGrid, Grid, SuperBlockGrid, dequantize

from .types import GGUFType, gguf_type

__all__ = ["unpack_tensor", "dequantize_raw", "element_fields"]


def _legacy_nibble(off: int) -> tuple[np.ndarray, np.ndarray]:
    j = np.arange(32)
    return off + j % 16, 4 * (j // 16)


def _q2_crumb(off: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(256)
    return off + 32 * (i // 128) + i % 32, 2 * ((i % 128) // 32)


def _k4_nibble(off: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(256)
    return off + 32 * (i // 64) + i % 32, 4 * ((i % 64) // 32)


def element_fields(name: str) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """Per element of a block: list of (byte index, bit shift, field width, position in code).

    ``code[i] = sum_f ((block[byte_f[i]] >> shift_f[i]) & (2**width_f - 1)) << pos_f``.
    """
    i256 = np.arange(256)
    j32 = np.arange(32)
    if name in ("Q4_0", "IQ4_NL"):
        return [(*_legacy_nibble(2), 4, 0)]
    if name == "Q4_1":
        return [(*_legacy_nibble(4), 4, 0)]
    if name in ("Q5_0", "Q5_1"):
        off = 2 if name == "Q5_0" else 4                       # qh right after d (and m)
        return [(*_legacy_nibble(off + 4), 4, 0), (off + j32 // 8, j32 % 8, 1, 4)]
    if name == "Q8_0":
        return [(2 + j32, np.zeros(32, int), 8, 0)]
    if name == "Q2_K":
        return [(*_q2_crumb(16), 2, 0)]
    if name == "Q3_K":
        return [(*_q2_crumb(32), 2, 0), (i256 % 32, i256 // 32, 1, 2)]
    if name == "Q4_K":
        return [(*_k4_nibble(16), 4, 0)]
    if name == "Q5_K":
        return [(*_k4_nibble(48), 4, 0), (16 + i256 % 32, (i256 // 32), 1, 4)]
    if name == "Q6_K":
        half, k, l = i256 // 128, (i256 % 128) // 32, i256 % 32
        return [(64 * half + 32 * (k % 2) + l, 4 * (k // 2), 4, 0),
                (128 + 32 * half + l, 2 * k, 2, 4)]
    if name == "IQ4_XS":
        ib, r = i256 // 32, i256 % 32
        return [(8 + 16 * ib + r % 16, 4 * (r // 16), 4, 0)]
    raise VerifyError(f"no decoder for GGUF type {name}")


def _codes(blocks: np.ndarray, name: str) -> np.ndarray:
    """uint8 blocks ``[..., type_size]`` -> uint8 codes ``[..., block_size]``."""
    code = None
    for byte, shift, width, pos in element_fields(name):
        part = (blocks[..., byte].astype(np.uint16) >> shift) & ((1 << width) - 1)
        code = part << pos if code is None else code | (part << pos)
    if name == "Q8_0":                                            # stored int8 q = code - 128
        code = code ^ 0x80
    return code.astype(np.uint8)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """fp16 at byte offset ``at`` of every block -> float32."""
    b = np.ascontiguousarray(blocks[..., at:at + 2])
    return b.view("<f2")[..., 0].astype(np.float32)


def _k4_scale_min(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp get_scale_min_k4 for j = 0..7 over the 12 scale bytes ``q [..., 12]``."""
    sc, mn = [], []
    for j in range(8):
        if j < 4:
            sc.append(q[..., j] & 63)
            mn.append(q[..., j + 4] & 63)
        else:
            sc.append((q[..., j + 4] & 0xF) | ((q[..., j - 4] >> 6) << 4))
            mn.append((q[..., j + 4] >> 4) | ((q[..., j] >> 6) << 4))
    return np.stack(sc, -1).astype(np.int16), np.stack(mn, -1).astype(np.int16)


def _q3_scales(q: np.ndarray) -> np.ndarray:
    """16 signed 6-bit sub-scales from the Q3_K 12 scale bytes ``[..., 12]``."""
    out = []
    for j in range(16):
        low = (q[..., j] & 0xF) if j < 8 else (q[..., j - 8] >> 4)
        high = (q[..., 8 + j % 4] >> (2 * (j // 4))) & 3
        out.append((low | (high << 4)).astype(np.int16) - 32)
    return np.stack(out, -1)


def _iq4_xs_scales(blocks: np.ndarray) -> np.ndarray:
    sh = np.ascontiguousarray(blocks[..., 2:4]).view("<u2")[..., 0].astype(np.int32)
    out = []
    for ib in range(8):
        low = (blocks[..., 4 + ib // 2] >> (4 * (ib % 2))) & 0xF
        out.append((low | (((sh >> (2 * ib)) & 3) << 4)).astype(np.int16) - 32)
    return np.stack(out, -1)


def _grid(blocks: np.ndarray, row: GGUFType) -> Grid:
    """Grid parameters from blocks ``[out, nb, type_size]`` in IR shapes ``[out, groups]``."""
    out_f, nb = blocks.shape[:2]
    n = row.name
    if n in ("Q4_0", "Q5_0", "Q8_0"):
        return AffineGrid(scales=_f16(blocks, 0))
    if n in ("Q4_1", "Q5_1"):
        return AffineGrid(scales=_f16(blocks, 0), mins=_f16(blocks, 2))
    if n == "IQ4_NL":
        return CodebookGrid(scales=_f16(blocks, 0))
    flat = lambda a: a.reshape(out_f, -1)   # noqa: E731  [out, nb, per] -> [out, groups]
    if n == "Q2_K":
        s = blocks[..., :16]
        return SuperBlockGrid(d=_f16(blocks, 80), sc=flat((s & 0xF).astype(np.int16)),
                              dmin=_f16(blocks, 82), m=flat((s >> 4).astype(np.int16)))
    if n == "Q3_K":
        return SuperBlockGrid(d=_f16(blocks, 108), sc=flat(_q3_scales(blocks[..., 96:108])))
    if n in ("Q4_K", "Q5_K"):
        sc, mn = _k4_scale_min(blocks[..., 4:16])
        return SuperBlockGrid(d=_f16(blocks, 0), sc=flat(sc), dmin=_f16(blocks, 2), m=flat(mn))
    if n == "Q6_K":
        sc = blocks[..., 192:208].view(np.int8).astype(np.int16)
        return SuperBlockGrid(d=_f16(blocks, 208), sc=flat(sc))
    if n == "IQ4_XS":
        return SuperBlockGrid(d=_f16(blocks, 0), sc=flat(_iq4_xs_scales(blocks)))
    raise VerifyError(f"no decoder for GGUF type {n}")


def unpack_tensor(raw: np.ndarray, type_name: str,
                  shape: tuple[int, int]) -> tuple[np.ndarray, Grid]:
    """GGUF bytes -> IR.

    Args:
        raw: uint8 ``[out, row_bytes]`` (or any array holding exactly those bytes).
        type_name: GGUF type name (``"Q4_K"``).
        shape: logical ``(out, in)`` of the weight.
    Returns:
        (codes uint8 ``[out, in]``, grid) on ``spec_for(type_name)``.
    """
    row = gguf_type(type_name)
    out_f, in_f = shape
    if in_f % row.block_size:
        raise VerifyError(f"{row.name}: in_features expected a multiple of {row.block_size} "
                          f"(not {in_f})")
    nb = in_f // row.block_size
    raw = np.ascontiguousarray(np.asarray(raw).view(np.uint8))
    if raw.size != out_f * nb * row.type_size:
        raise VerifyError(f"{row.name} {list(shape)}: expected {out_f * nb * row.type_size} "
                          f"bytes (not {raw.size})")
    blocks = raw.reshape(out_f, nb, row.type_size)
    codes = _codes(blocks, row.name).reshape(out_f, in_f)
    return codes, _grid(blocks, row)


def dequantize_raw(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """GGUF bytes -> float32 ``[out, in]`` weights (the IR value of those bytes)."""
    codes, grid = unpack_tensor(raw, type_name, shape)
    return dequantize(codes, grid, gguf_type(type_name).spec)
