"""llama.cpp's k-quant quantizers (Q2_K..Q6_K), ``*_ref`` (no imatrix) and ``*_impl`` paths.

Each function takes super-blocks ``x [S, 256]`` float32 (and, for the imatrix paths, the
matching per-column importance ``qw [S, 256]``) and returns what llama.cpp stores, as IR pieces:
``(codes uint8 [S, 256], d [S], sc int16 [S, n_sub], dmin [S] | None, m int16 [S, n_sub] | None)``
with ``d``/``dmin`` already fp16-rounded. Sub-scales are taken from the bytes llama.cpp would
write (its integer wrap-around included), and codes are llama.cpp's final ``L`` (requantized
with the stored fp16 ``d``/``dmin``; a sub-block whose effective scale is 0 keeps the search's
codes, as llama.cpp does). See ``llamacpp_search`` for the helpers.

| type | sub-blocks | no imatrix (``quantize_row_*_ref``)              | imatrix (``*_impl``)              |
|------|------------|--------------------------------------------------|-----------------------------------|
| Q2_K | 16 x 16    | qkx2(3, w=|x|, -0.5, 0.1, 15, mad); d = max/15   | qkx3(3, -0.9, 0.05, 36); qp(15)   |
| Q3_K | 16 x 16    | q3_quants(4); d = max/-32                        | qx(4, w); qx(32, sw)              |
| Q4_K | 8 x 32     | qkx2(15, w=av+|x|, -1, 0.1, 20); d = max/63      | qkx3(15, ...); qp(63)             |
| Q5_K | 8 x 32     | qkx2(31, w=av+|x|, -0.5, 0.1, 15); d = max/63    | qkx3(31, ...); qp(63)             |
| Q6_K | 16 x 16    | qx(32, w=x^2); d = max/-128                      | qx(32, w=qw)                      |
"""
from __future__ import annotations

import numpy as np

from .llamacpp_search import (F, GROUP_MAX_EPS, f16, first_absmax, make_q3_quants,
                              make_qkx_quants, make_qp_quants, make_qx_quants, nearest_int,
                              seq_sum)

__all__ = ["quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]


def _sub(x: np.ndarray, n: int) -> np.ndarray:
    """[S, 256] -> [S * 256/n, n] sub-blocks."""
    return x.reshape(-1, n)


def _pos_max(v: np.ndarray) -> np.ndarray:
    """``float m = 0; if (v > m) m = v`` over the last axis."""
    top = v.max(axis=-1)
    return np.where(top > 0, top, F(0)).astype(F)


def _requant(x: np.ndarray, L: np.ndarray, d_eff: np.ndarray, dm_eff: np.ndarray | None,
             lo: int, hi: int, offset: int) -> np.ndarray:
    """llama.cpp's final pass per sub-block: ``L = clamp(nearest_int((x + dm)/d)) + offset``
    where ``d != 0``; other sub-blocks keep L. x, L ``[S, n_sub, n]``; d_eff ``[S, n_sub]``."""
    num = x if dm_eff is None else x + dm_eff[..., None]
    q = np.clip(nearest_int(num / d_eff[..., None]), lo, hi) + offset
    return np.where((d_eff != 0)[..., None], q, L)


def _k4_bytes_roundtrip(ls: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write uint8 scales/mins ``[S, 8]`` into the 12 bytes exactly as llama.cpp does (bits
    beyond 6 included), then read them back with get_scale_min_k4."""
    ls, lm = ls.astype(np.int64) & 0xFF, lm.astype(np.int64) & 0xFF
    q = np.zeros(ls.shape[:-1] + (12,), dtype=np.int64)
    q[..., 0:4], q[..., 4:8] = ls[..., :4], lm[..., :4]
    q[..., 8:12] = ((ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)) & 0xFF
    q[..., 0:4] |= ((ls[..., 4:] >> 4) << 6) & 0xFF
    q[..., 4:8] |= ((lm[..., 4:] >> 4) << 6) & 0xFF
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], -1)
    return sc.astype(np.int16), mn.astype(np.int16)


def _sigma2(x: np.ndarray, times_two: bool) -> np.ndarray:
    """``sum_x2/QK_K`` (Q2_K) or ``2*sum_x2/QK_K`` (Q3_K..Q5_K) per super-block ([S])."""
    s = seq_sum(x * x)
    return ((F(2) * s if times_two else s) / F(256)).astype(F)


def _imatrix_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """``qw * sqrtf(sigma2 + x*x)`` ([S, 256])."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def quantize_q2_k(x: np.ndarray, qw: np.ndarray | None):
    S = len(x)
    xs = _sub(x, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True, v3=False)
        scales, mins = scales.reshape(S, 16), mins.reshape(S, 16)
        max_scale, max_min = _pos_max(scales), _pos_max(mins)
        ls = nearest_int((F(15) / max_scale)[:, None] * scales) & 0xFF
        byte = np.where((max_scale > 0)[:, None], ls, 0)
        lm = (nearest_int((F(15) / max_min)[:, None] * mins) << 4) & 0xFF
        byte = np.where((max_min > 0)[:, None], byte | lm, byte)
        d = np.where(max_scale > 0, f16(max_scale / F(15)), F(0)).astype(F)
        dmin = np.where(max_min > 0, f16(max_min / F(15)), F(0)).astype(F)
    else:
        w = _imatrix_weights(x, qw, _sigma2(x, False))
        ws = _sub(w, 16)
        scales, mins, L = make_qkx_quants(xs, ws, 3, -0.9, 0.05, 36, False, v3=True)
        sw = seq_sum(ws).reshape(S, 16)
        dm, Ls = make_qp_quants(scales.reshape(S, 16), 15, sw)
        mm, Lm = make_qp_quants(mins.reshape(S, 16), 15, sw)
        byte = (Ls | (Lm << 4)) & 0xFF
        d, dmin = f16(dm), f16(mm)
    sc, m = (byte & 0xF).astype(np.int16), (byte >> 4).astype(np.int16)
    L = _requant(x.reshape(S, 16, 16), L.reshape(S, 16, 16), d[:, None] * sc.astype(F),
                 dmin[:, None] * m.astype(F), 0, 3, 0)
    return L.reshape(S, 256).astype(np.uint8), d, sc, dmin, m


def _q3_pack_scale(l: np.ndarray) -> np.ndarray:
    """int8 wrap, clamp to -32..31 (the 6-bit sub-scale stored with +32)."""
    l8 = ((l + 128) & 0xFF) - 128
    return np.clip(l8, -32, 31)


def quantize_q3_k(x: np.ndarray, qw: np.ndarray | None):
    S = len(x)
    xs = _sub(x, 16)
    if qw is None:
        scales, L = make_q3_quants(xs, 4)
        scales = scales.reshape(S, 16)
        _, max_scale = first_absmax(scales)
        iscale = F(-32) / max_scale
        sc = _q3_pack_scale(nearest_int(iscale[:, None] * scales))
        nz = max_scale != 0
        sc = np.where(nz[:, None], sc, -32)              # all-zero scale bytes read as -32
        d = np.where(nz, f16(F(1) / iscale), F(0)).astype(F)
    else:
        w = _imatrix_weights(x, qw, _sigma2(x, True))
        ws = _sub(w, 16)
        scales, L = make_qx_quants(xs, 4, ws)
        sw = seq_sum(ws).reshape(S, 16)
        d_block, Ls = make_qx_quants(scales.reshape(S, 16), 32, sw)
        sc = Ls - 32
        d = f16(d_block)
    sc = sc.astype(np.int16)
    L = _requant(x.reshape(S, 16, 16), L.reshape(S, 16, 16), d[:, None] * sc.astype(F), None,
                 -4, 3, 4)
    return L.reshape(S, 256).astype(np.uint8), d, sc, None, None


def _quantize_q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int, rmin: float,
                    nstep: int, clamp_impl: bool):
    S = len(x)
    xs = _sub(x, 32)
    if qw is None:
        av_x = np.sqrt(seq_sum(xs * xs) / F(32))
        ws = av_x[:, None] + np.abs(xs)
        scales, mins, L = make_qkx_quants(xs, ws, nmax, rmin, 0.1, nstep, False, v3=False)
        scales, mins = scales.reshape(S, 8), mins.reshape(S, 8)
        max_scale, max_min = _pos_max(scales), _pos_max(mins)
        inv_s = np.where(max_scale > 0, F(63) / max_scale, F(0)).astype(F)
        inv_m = np.where(max_min > 0, F(63) / max_min, F(0)).astype(F)
        ls = np.minimum(63, nearest_int(inv_s[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_m[:, None] * mins) & 0xFF)
        d, dmin = f16(max_scale / F(63)), f16(max_min / F(63))
    else:
        w = _imatrix_weights(x, qw, _sigma2(x, True))
        ws = _sub(w, 32)
        scales, mins, L = make_qkx_quants(xs, ws, nmax, -0.9, 0.05, 36, False, v3=True)
        sw = seq_sum(ws).reshape(S, 8)
        d_block, ls = make_qp_quants(scales.reshape(S, 8), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(S, 8), 63, sw)
        if clamp_impl:                                   # Q5_K's impl clamps, Q4_K's does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d, dmin = f16(d_block), f16(m_block)
    sc, m = _k4_bytes_roundtrip(ls, lm)
    L = _requant(x.reshape(S, 8, 32), L.reshape(S, 8, 32), d[:, None] * sc.astype(F),
                 dmin[:, None] * m.astype(F), 0, nmax, 0)
    return L.reshape(S, 256).astype(np.uint8), d, sc, dmin, m


def quantize_q4_k(x: np.ndarray, qw: np.ndarray | None):
    return _quantize_q45_k(x, qw, 15, -1.0, 20, clamp_impl=False)


def quantize_q5_k(x: np.ndarray, qw: np.ndarray | None):
    return _quantize_q45_k(x, qw, 31, -0.5, 15, clamp_impl=True)


def quantize_q6_k(x: np.ndarray, qw: np.ndarray | None):
    S = len(x)
    xs = _sub(x, 16)
    scales, L = make_qx_quants(xs, 32, None if qw is None else _sub(qw, 16))
    scales = scales.reshape(S, 16)
    max_abs, max_scale = first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS                       # llama.cpp zeroes the whole block
    iscale = F(-128) / max_scale
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
    sc = (((sc + 128) & 0xFF) - 128).astype(np.int16)      # stored as int8
    d = f16(F(1) / iscale)
    L = _requant(x.reshape(S, 16, 16), L.reshape(S, 16, 16), d[:, None] * sc.astype(F), None,
                 -32, 31, 32).reshape(S, 256)
    L = np.where(zero[:, None], 0, L)
    sc = np.where(zero[:, None], 0, sc).astype(np.int16)
    d = np.where(zero, F(0), d).astype(F)
    return L.astype(np.uint8), d, sc, None, None
