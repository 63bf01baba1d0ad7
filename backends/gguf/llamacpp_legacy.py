"""llama.cpp's quantizers for the 32-element types and IQ4_XS, vectorised over blocks.

| type   | no imatrix (``quantize_row_*_ref``)                  | imatrix (``quantize_row_*_impl``)      |
|--------|------------------------------------------------------|----------------------------------------|
| Q4_0   | d = max/-8, q = min(15, (int8)(x/d + 8.5))           | make_qx_quants(8, w)                   |
| Q5_0   | d = max/-16, q = min(31, (int8)(x/d + 16.5))         | make_qx_quants(16, w)                  |
| Q4_1   | d = (max-min)/15, m = min, q = (x-min)/d + 0.5       | make_qkx3_quants(15, w, -0.9,0.05,36)  |
| Q5_1   | d = (max-min)/31, as Q4_1 (no clamp: uint8 cast)     | make_qkx3_quants(31, w, ...)           |
| Q8_0   | d = amax/127, q = roundf(x/d)                        | (imatrix ignored)                      |
| IQ4_NL | quantize_row_iq4_nl_impl(32, 32, ntry=7), w = x^2    | same, w = qw*sqrt(sigma2 + x^2)        |
| IQ4_XS | quantize_row_iq4_nl_impl(256, 32, ntry=7)            | same with imatrix weights              |

With an imatrix the legacy types weight by ``qw * sqrt(sigma2 + x^2)`` with ``sigma2`` the mean
of ``x^2`` over the whole row; IQ4 uses ``2 * mean x^2`` over its super-block. Codes are what
llama.cpp stores: computed from the fp32 scale before it is rounded to fp16 (the stored fp16
value is what the IR holds). Functions take blocks ``x [B, 32]`` (or ``[S, 256]`` for IQ4_XS)
and return ``(codes uint8, d fp16-rounded[, m])``.
"""
from __future__ import annotations

import numpy as np

from .llamacpp_search import (F, GROUP_MAX_EPS, best_index_int8, f16, first_absmax,
                              make_qkx_quants, make_qx_quants, nearest_int, seq_sum)
from .types import KVALUES_IQ4NL

__all__ = ["quantize_legacy", "quantize_iq4_nl", "quantize_iq4_xs", "row_sigma2"]

_KV = np.asarray(KVALUES_IQ4NL, dtype=F)


def row_sigma2(W: np.ndarray) -> np.ndarray:
    """``sum_x2 / n_per_row`` per row, summed left to right ([out])."""
    return (seq_sum(W * W) / F(W.shape[1])).astype(F)


def _seq_minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``min = FLT_MAX; max = -FLT_MAX; if (v < min) min = v; if (v > max) max = v``."""
    mn = np.full(len(x), np.finfo(F).max, dtype=F)
    mx = -mn
    for j in range(x.shape[1]):
        mn = np.where(x[:, j] < mn, x[:, j], mn)
        mx = np.where(x[:, j] > mx, x[:, j], mx)
    return mn, mx


def _trunc_u8(v: np.ndarray) -> np.ndarray:
    """C ``(int8_t)(v)`` (truncation toward zero, then 8-bit wrap) as an int."""
    return ((np.trunc(v).astype(np.int64) + 128) & 0xFF) - 128


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exactly, for float32."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(F(2) * (a - fl)))


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    return np.where(d != 0, F(1) / d, F(0)).astype(F)


def _ref(x: np.ndarray, name: str) -> tuple[np.ndarray, ...]:
    if name in ("Q4_0", "Q5_0"):
        half = 8 if name == "Q4_0" else 16
        _, mx = first_absmax(x)
        d = (mx / F(-half)).astype(F)
        q = _trunc_u8(x * _inv(d)[:, None] + F(half + 0.5))
        return np.minimum(2 * half - 1, q) & 0xFF, f16(d)
    if name in ("Q4_1", "Q5_1"):
        mn, mx = _seq_minmax(x)
        nmax = 15 if name == "Q4_1" else 31
        d = ((mx - mn) / F(nmax)).astype(F)
        q = _trunc_u8((x - mn[:, None]) * _inv(d)[:, None] + F(0.5))
        q = np.minimum(15, q) if name == "Q4_1" else q       # Q5_1 casts to uint8 without MIN
        return q & 0xFF, f16(d), f16(mn)
    amax = np.zeros(len(x), dtype=F)                          # Q8_0: amax = MAX(amax, |v|)
    for j in range(x.shape[1]):
        a = np.abs(x[:, j])
        amax = np.where(amax > a, amax, a)
    d = (amax / F(127)).astype(F)
    q = _roundf(x * _inv(d)[:, None]).astype(np.int64)
    return (q + 128) & 0xFF, f16(d)


def quantize_legacy(W: np.ndarray, name: str, imatrix: np.ndarray | None
                    ) -> tuple[np.ndarray, ...]:
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 of ``W [out, in]`` (in % 32 == 0).

    Returns (codes uint8 ``[out, in]``, d ``[out, in/32]``[, m ``[out, in/32]``]).
    """
    out_f, in_f = W.shape
    x = W.reshape(-1, 32)
    if imatrix is None or name == "Q8_0":
        res = _ref(x, name)
    else:
        sigma2 = np.repeat(row_sigma2(W), in_f // 32)[:, None]
        w = np.broadcast_to(imatrix, W.shape).reshape(-1, 32) * np.sqrt(sigma2 + x * x)
        if name in ("Q4_0", "Q5_0"):
            d, L = make_qx_quants(x, 8 if name == "Q4_0" else 16, w)
            res = (L, f16(d))
        else:
            nmax = 15 if name == "Q4_1" else 31
            d, the_min, L = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, False, v3=True)
            res = (L, f16(d), f16(-the_min))
    codes = res[0].reshape(out_f, in_f).astype(np.uint8)
    return (codes,) + tuple(p.reshape(out_f, in_f // 32) for p in res[1:])


def _iq4_block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-32 scale search of quantize_row_iq4_nl_impl (ntry = 7); x, w ``[B, 32]``."""
    amax, mx = first_absmax(x)

    def trial(idv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _KV[best_index_int8(_KV, idv[:, None] * x)]
        wq = w * q
        return seq_sum(wq * x), seq_sum(wq * q)

    d0 = (-mx / _KV[0]).astype(F)
    sumqx, sumq2 = trial((F(1) / d0).astype(F))
    d = np.where(sumq2 > 0, sumqx / sumq2, F(0)).astype(F)
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = trial((F(itry + KVALUES_IQ4NL[0]) / mx).astype(F))
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(upd, sumqx / sumq2, d).astype(F)
        best = np.where(upd, d * sumqx, best).astype(F)
    return np.where(amax < GROUP_MAX_EPS, F(0), d).astype(F)


def _iq4_weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x ``[S, size]`` super-blocks; weights ``qw*sqrt(sigma2 + x^2)`` or ``x^2``."""
    if qw is None:
        return x * x
    sigma2 = seq_sum(x * x) * F(2.0 / x.shape[1])
    return qw * np.sqrt(sigma2[:, None] + x * x)


def quantize_iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_NL of blocks ``x [B, 32]`` -> (codes uint8 ``[B, 32]``, d fp16-rounded ``[B]``)."""
    scale = _iq4_block_scales(x, _iq4_weights(x, qw))
    codes = best_index_int8(_KV, _inv(scale)[:, None] * x)
    return codes.astype(np.uint8), f16(scale)


def quantize_iq4_xs(x: np.ndarray, qw: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQ4_XS of super-blocks ``x [S, 256]`` -> (codes, d fp16-rounded ``[S]``, sc int16
    ``[S, 8]`` in -32..31)."""
    S = len(x)
    w = _iq4_weights(x, qw)
    scales = _iq4_block_scales(x.reshape(-1, 32), w.reshape(-1, 32)).reshape(S, 8)
    _, max_scale = first_absmax(scales)
    d = (-max_scale / F(32)).astype(F)
    l = np.clip(nearest_int(_inv(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.astype(F)
    codes = best_index_int8(_KV, (_inv(dl)[..., None] * x.reshape(S, 8, 32)))
    return codes.reshape(S, 256).astype(np.uint8), f16(d), l.astype(np.int16)
