"""Byte packers of the 256-element GGUF super-blocks: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS.

Hand-written (gguf-py packs none of these; layouts from llama.cpp ``ggml-common.h`` and
``quantize_row_*_ref``). Every function takes codes uint8 ``[out, ns, 256]``, super-scales
float32 ``[out, ns]`` and sub-block integers ``[out, ns, n_sub]`` and returns uint8
``[out, ns, type_size]``.

| type   | byte layout (little-endian)                          | sub-blocks              |
|--------|------------------------------------------------------|-------------------------|
| Q2_K   | scales(16) = sc | m<<4, qs(64), d(2), dmin(2)         | 16 x 16, sc/m 0..15     |
| Q3_K   | hmask(32), qs(64), scales(12) 6-bit sc+32, d(2)       | 16 x 16, sc -32..31     |
| Q4_K   | d(2), dmin(2), scales(12) 6-bit sc/m, qs(128)         | 8 x 32, sc/m 0..63      |
| Q5_K   | d(2), dmin(2), scales(12), qh(32), qs(128)            | 8 x 32, sc/m 0..63      |
| Q6_K   | ql(128), qh(64), scales(16) int8, d(2)                | 16 x 16, sc -128..127   |
| IQ4_XS | d(2), scales_h(2) u16, scales_l(4), qs(128)           | 8 x 32, sc+32 in 0..63  |

2-bit fields (Q2_K qs, Q3_K low bits): for half h of 128 elements, byte ``32h + l`` holds
elements ``128h + 32k + l`` in bits ``2k..2k+1``. Q3_K's third bit of element i is bit ``i//32``
of ``hmask[i%32]``. Q4_K/Q5_K nibbles: byte ``32c + l`` holds elements ``64c + l`` (low) and
``64c + 32 + l`` (high); Q5_K's fifth bits go to ``qh[l]`` bits ``2c`` / ``2c+1``. Q6_K: for half
h, ``ql[64h + l]`` = low nibbles of elements ``l`` | ``l+64``, ``ql[64h+32+l]`` = ``l+32`` | ``l+96``,
``qh[32h+l]`` = top 2 bits of ``l, l+32, l+64, l+96`` at bits 0, 2, 4, 6 (offsets within the half).
"""
from __future__ import annotations

import numpy as np

from .pack_legacy import fp16_bytes, nibbles

__all__ = ["pack_q2_k", "pack_q3_k", "pack_q4_k", "pack_q5_k", "pack_q6_k", "pack_iq4_xs",
           "k4_scale_bytes"]


def _shift_or(parts: np.ndarray, width: int) -> np.ndarray:
    """OR ``parts[..., k, :] << (width*k)`` over axis -2 -> uint8 (or uint16 if it needs it)."""
    acc = np.zeros(parts.shape[:-2] + parts.shape[-1:], dtype=np.uint32)
    for k in range(parts.shape[-2]):
        acc |= parts[..., k, :].astype(np.uint32) << np.uint32(width * k)
    return acc


def _crumbs(c: np.ndarray) -> np.ndarray:
    """2-bit layout of 256 codes (low 2 bits used) -> uint8 ``[..., 64]``."""
    lead = c.shape[:-1]
    parts = (c & 3).reshape(*lead, 2, 4, 32)                # [half, k, l]
    return _shift_or(parts, 2).astype(np.uint8).reshape(*lead, 64)


def _nibble_chunks(c: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K/IQ4-style low nibbles: pairs (chunk lo, chunk hi) of ``2*half`` elements."""
    lead = c.shape[:-1]
    return nibbles(c.reshape(*lead, 4, 2, 32)[..., 0, :],
                   c.reshape(*lead, 4, 2, 32)[..., 1, :]).reshape(*lead, 128)


def k4_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte packing of 8 six-bit scales and mins ``[..., 8]`` -> ``[..., 12]``."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    b0 = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    b4 = (m[..., :4] & 0x3F) | ((m[..., 4:] >> 4) << 6)
    b8 = nibbles(sc[..., 4:], m[..., 4:])
    return np.concatenate([b0, b4, b8], axis=-1).astype(np.uint8)


def pack_q2_k(c: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray,
              m: np.ndarray) -> np.ndarray:
    scales = nibbles(sc.astype(np.uint8), m.astype(np.uint8))
    return np.concatenate([scales, _crumbs(c), fp16_bytes(d), fp16_bytes(dmin)], axis=-1)


def pack_q3_k(c: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: None = None,
              m: None = None) -> np.ndarray:
    lead = c.shape[:-1]
    hbits = ((c >> 2) & 1).reshape(*lead, 8, 32)          # [i // 32, i % 32]
    hmask = _shift_or(hbits, 1).astype(np.uint8)
    s = (sc.astype(np.int16) + 32).astype(np.uint8)       # 0..63
    low = nibbles(s[..., :8], s[..., 8:])                   # scales[j] low / scales[j-8] high
    high = _shift_or((s >> 4).reshape(*lead, 4, 4), 2).astype(np.uint8)   # [j // 4, j % 4]
    return np.concatenate([hmask, _crumbs(c), low, high, fp16_bytes(d)], axis=-1)


def pack_q4_k(c: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray,
              m: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), k4_scale_bytes(sc, m),
                           _nibble_chunks(c)], axis=-1)


def pack_q5_k(c: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray,
              m: np.ndarray) -> np.ndarray:
    lead = c.shape[:-1]
    fifth = ((c >> 4) & 1).reshape(*lead, 8, 32)           # [2*chunk + hi, l]
    qh = _shift_or(fifth, 1).astype(np.uint8)
    return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), k4_scale_bytes(sc, m), qh,
                           _nibble_chunks(c)], axis=-1)


def pack_q6_k(c: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: None = None,
              m: None = None) -> np.ndarray:
    lead = c.shape[:-1]
    e = c.reshape(*lead, 2, 4, 32)                          # [half, k, l] = element 32k + l
    ql = np.concatenate([nibbles(e[..., 0, :], e[..., 2, :]),
                         nibbles(e[..., 1, :], e[..., 3, :])], axis=-1)   # [half, 64]
    qh = _shift_or(e >> 4, 2).astype(np.uint8)              # [half, 32]
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql.reshape(*lead, 128), qh.reshape(*lead, 64), scales,
                           fp16_bytes(d)], axis=-1)


def pack_iq4_xs(c: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: None = None,
                m: None = None) -> np.ndarray:
    lead = c.shape[:-1]
    ls = (sc.astype(np.int16) + 32).astype(np.uint16)       # [..., 8] in 0..63
    scales_h = np.zeros(lead, dtype=np.uint16)
    for ib in range(8):
        scales_h |= (ls[..., ib] >> 4) << np.uint16(2 * ib)
    sh = np.ascontiguousarray(scales_h.astype("<u2")).view(np.uint8).reshape(*lead, 2)
    sl = nibbles(ls[..., 0::2].astype(np.uint8), ls[..., 1::2].astype(np.uint8))
    qs = nibbles(c.reshape(*lead, 8, 2, 16)[..., 0, :],
                 c.reshape(*lead, 8, 2, 16)[..., 1, :]).reshape(*lead, 128)
    return np.concatenate([fp16_bytes(d), sh, sl, qs], axis=-1)
