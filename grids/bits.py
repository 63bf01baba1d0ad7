"""Dense little-endian bit packing of small unsigned codes (numpy only).

``pack_bits(codes, bits)`` writes code ``i`` into bits ``[i*bits, (i+1)*bits)`` of one long
little-endian bit stream (bit 0 = least significant bit of byte 0), padded with zero bits to a
whole byte; ``unpack_bits`` inverts it. Backends that pack into words (GPTQ's int32
``qweight``, compressed-tensors' ``weight_packed``) view the result as ``<u4`` words when the
bit width divides 32, or use it directly as GPTQ's 3-bit 32-values-in-3-words layout, which is
exactly this stream.
"""
from __future__ import annotations

import numpy as np

from .errors import GridError


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` (uint8, values < 2**bits) into uint8 bytes.

    Args:
        codes: uint8 ``[..., n]``.
        bits: 1..8.
    Returns:
        uint8 ``[..., ceil(n * bits / 8)]``.
    """
    if not 1 <= bits <= 8:
        raise GridError(f"pack_bits: bits expected in 1..8 (not {bits})")
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise GridError(f"pack_bits: codes expected uint8 (not {codes.dtype})")
    if codes.size and int(codes.max()) >= 2 ** bits:
        raise GridError(f"pack_bits: code {int(codes.max())} does not fit in {bits} bits")
    n = codes.shape[-1]
    # [..., n, bits] little-endian bit planes -> one stream per leading index
    planes = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = planes.reshape(*codes.shape[:-1], n * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 ``[..., nbytes]`` -> uint8 codes ``[..., n]``."""
    if not 1 <= bits <= 8:
        raise GridError(f"unpack_bits: bits expected in 1..8 (not {bits})")
    packed = np.asarray(packed, dtype=np.uint8)
    need = -(-n * bits // 8)
    if packed.shape[-1] < need:
        raise GridError(f"unpack_bits: expected at least {need} bytes for {n} codes of {bits} "
                        f"bits (found {packed.shape[-1]})")
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n * bits]
    planes = stream.reshape(*packed.shape[:-1], n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.astype(np.uint16) * weights).sum(axis=-1).astype(np.uint8)
