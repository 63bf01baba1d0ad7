"""Numpy reference decoder of MatMulNBits initializers (independent of the packer).

Written from the operator's contract (specs.py table), with shifts and masks rather than the
bit-stream helper the packer uses, so a packing mistake cannot cancel out in a round trip.
"""
from __future__ import annotations

import numpy as np

from qexport.errors import VerifyError

__all__ = ["unpack_nbits", "decode_mnb_codes", "decode_mnb_zero_points", "decode_mnb"]


def unpack_nbits(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``[..., nbytes]`` -> uint8 ``[..., nbytes * 8 // bits]``, low bits first."""
    if bits not in (2, 4, 8):
        raise VerifyError(f"MatMulNBits bits expected 2, 4 or 8 (not {bits})")
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def decode_mnb_codes(B: np.ndarray, K: int, N: int, bits: int, block_size: int) -> np.ndarray:
    """``B`` uint8 ``[N, k_blocks, blob]`` -> codes uint8 ``[N, K]`` (padding dropped)."""
    kb = -(-K // block_size)
    blob = block_size * bits // 8
    if B.dtype != np.uint8 or B.size != N * kb * blob:
        raise VerifyError(f"MatMulNBits B: expected uint8 with {N}*{kb}*{blob} bytes "
                          f"(found {B.dtype} {list(B.shape)})")
    q = unpack_nbits(B.reshape(N, kb * blob), bits)
    return q[:, :K]


def decode_mnb_zero_points(zp: np.ndarray | None, N: int, k_blocks: int,
                           bits: int) -> np.ndarray:
    """Packed uint8 zero points -> uint8 ``[N, k_blocks]``; None -> the implicit 2**(bits-1)."""
    if zp is None:
        return np.full((N, k_blocks), 2 ** (bits - 1), dtype=np.uint8)
    if zp.dtype != np.uint8:
        raise VerifyError(f"MatMulNBits zero_points: expected packed uint8 (not {zp.dtype})")
    per_row = -(-k_blocks * bits // 8)
    if zp.size != N * per_row:
        raise VerifyError(f"MatMulNBits zero_points: expected {N}*{per_row} bytes "
                          f"(found {list(zp.shape)})")
    return unpack_nbits(zp.reshape(N, per_row), bits)[:, :k_blocks]


def decode_mnb(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int,
               N: int, bits: int, block_size: int) -> np.ndarray:
    """Dequantized weight float32 ``[N, K]``: ``(q - zp) * scale`` per block, in fp32.

    ``scales`` may be float32 or float16 (``[N, k_blocks]`` or flat); they are widened exactly.
    """
    kb = -(-K // block_size)
    q = decode_mnb_codes(B, K, N, bits, block_size).astype(np.int32)
    z = decode_mnb_zero_points(zero_points, N, kb, bits).astype(np.int32)
    s = np.asarray(scales).astype(np.float32).reshape(N, kb)
    col_block = np.arange(K) // block_size
    return s[:, col_block] * (q - z[:, col_block]).astype(np.float32)
