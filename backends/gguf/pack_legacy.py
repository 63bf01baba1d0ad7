"""Byte packers of the 32-element GGUF blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Hand-written (llama.cpp ``block_q4_0`` ... ``block_iq4_nl``); every function takes codes
uint8 ``[out, nb, 32]`` and per-block float32 parameters ``[out, nb]`` (fp16-representable) and
returns uint8 ``[out, nb, type_size]``. Layouts (all little-endian):

| type   | bytes                                  | element j of the block              |
|--------|----------------------------------------|-------------------------------------|
| Q4_0   | d(2) qs(16)                            | qs[j%16] nibble j//16 (low first)   |
| Q4_1   | d(2) m(2) qs(16)                       | as Q4_0                             |
| Q5_0   | d(2) qh(4) qs(16)                      | low 4 bits as Q4_0; bit 4 = qh u32 bit j |
| Q5_1   | d(2) m(2) qh(4) qs(16)                 | as Q5_0                             |
| Q8_0   | d(2) qs(32) int8                       | qs[j] = code - 128                  |
| IQ4_NL | d(2) qs(16)                            | as Q4_0 (code = kvalues index)      |
"""
from __future__ import annotations

import numpy as np

__all__ = ["fp16_bytes", "nibbles", "pack_q4_0", "pack_q4_1", "pack_q5_0", "pack_q5_1",
           "pack_q8_0", "pack_iq4_nl"]


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 ``[...]`` (fp16-representable) -> uint8 ``[..., 2]`` little-endian fp16."""
    h = np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype("<f2"))
    return h.view(np.uint8).reshape(*h.shape, 2)


def nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Two uint8 arrays of 4-bit values -> one byte each: ``lo | hi << 4``."""
    return ((lo & 0x0F) | ((hi & 0x0F) << 4)).astype(np.uint8)


def _qs32(c: np.ndarray) -> np.ndarray:
    """Low nibbles of a 32-element block: element j in byte j%16, high nibble for j >= 16."""
    return nibbles(c[..., :16], c[..., 16:])


def _qh32(c: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 codes as one little-endian u32 (bit j = element j)."""
    return np.packbits((c >> 4) & 1, axis=-1, bitorder="little")


def pack_q4_0(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), _qs32(c)], axis=-1)


def pack_q4_1(c: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), _qs32(c)], axis=-1)


def pack_q5_0(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), _qh32(c), _qs32(c)], axis=-1)


def pack_q5_1(c: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), _qh32(c), _qs32(c)], axis=-1)


def pack_q8_0(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    # int8 q = code - 128, stored as its two's-complement byte: (code - 128) mod 256 = code ^ 0x80
    return np.concatenate([fp16_bytes(d), (c ^ 0x80).astype(np.uint8)], axis=-1)


def pack_iq4_nl(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), _qs32(c)], axis=-1)
