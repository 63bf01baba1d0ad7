"""llama.cpp's scale searches (``ggml-quants.c`` helpers), vectorised over many blocks.

Re-implemented in numpy float32 with llama.cpp's exact operation order, so that the codes and
scales equal what ``llama-quantize`` stores byte for byte. Every function works on a batch of
independent blocks ``x [B, n]`` (float32) at once; the loops that remain are over the ``n``
elements of a block (llama.cpp accumulates its sums sequentially, and so must we: a pairwise
``np.sum`` rounds differently) and over the search steps.

| llama.cpp            | here                  | returns                                        |
|----------------------|-----------------------|------------------------------------------------|
| nearest_int          | ``nearest_int``       | int32, the ``+12582912.f`` trick (ties-to-even)|
| make_qx_quants       | ``make_qx_quants``    | signed scale, L = l + nmax                     |
| make_q3_quants       | ``make_q3_quants``    | signed scale, L = l + nmax (do_rmse = true)    |
| make_qkx2/3_quants   | ``make_qkx_quants``   | scale, the_min >= 0, L in 0..nmax              |
| make_qp_quants       | ``make_qp_quants``    | super-scale, L (uint8 semantics)               |
| best_index_int8      | ``best_index_int8``   | index into a sorted int8 table                 |

Source: llama.cpp ``ggml/src/ggml-quants.c`` as vendored by llama-cpp-python 0.3.36.
"""
from __future__ import annotations

import numpy as np

__all__ = ["F", "GROUP_MAX_EPS", "nearest_int", "seq_sum", "first_absmax", "f16",
           "make_qx_quants", "make_q3_quants", "make_qkx_quants", "make_qp_quants",
           "best_index_int8"]

F = np.float32
GROUP_MAX_EPS = F(1e-15)
_MAGIC = F(12582912.0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp nearest_int: add 1.5 * 2**23 in fp32 and read the mantissa (int32)."""
    s = (np.asarray(v, dtype=F) + _MAGIC).astype(F)
    return (s.view(np.int32) & 0x007FFFFF) - 0x00400000


def f16(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): round to fp16 (RNE), back to float32."""
    return np.asarray(v, dtype=F).astype(np.float16).astype(F)


def seq_sum(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for i: s += a[i]`` along the last axis, in fp32, left to right."""
    s = np.zeros(a.shape[:-1], dtype=F)
    for i in range(a.shape[-1]):
        s = s + a[..., i]
    return s


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the first element of largest |x| along the last axis, and its signed value
    (llama.cpp's ``if (ax > amax) { amax = ax; max = x[i]; }`` starting from 0)."""
    idx = np.argmax(np.abs(x), axis=-1)[..., None]
    mx = np.take_along_axis(x, idx, axis=-1)[..., 0]
    mx = np.where(mx == 0, F(0), mx).astype(F)      # all zero: max stays +0.0, never -0.0
    return np.abs(mx), mx


def _clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.minimum(np.maximum(v, lo), hi)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric search.

    Args: x float32 ``[B, n]``; qw float32 ``[B, n]`` weights or None (then ``x*x``).
    Returns: (scale float32 ``[B]``, L int32 ``[B, n]`` in ``0..2*nmax-1``; 0 for all-zero).
    """
    amax, mx = first_absmax(x)
    w = x * x if qw is None else qw
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = _clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F)
        return l, seq_sum(wx * lf), seq_sum((w * lf) * lf)

    l, sumlx, suml2 = trial(F(-nmax) / mx)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(F)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(step)) / mx)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(upd[:, None], l + nmax, L)
        scale = np.where(upd, sumlx / suml2, scale).astype(F)
        best = np.where(upd, scale * sumlx, best).astype(F)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F(0), scale).astype(F), np.where(zero[:, None], 0, L)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): RTN then <= 5 coordinate-descent passes.

    Returns: (scale float32 ``[B]``, L int32 ``[B, n]`` = l + nmax; 0 for all-zero blocks).
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    L = _clip(nearest_int((F(-nmax) / mx)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    Lf = L.astype(F)
    sumlx, suml2 = seq_sum(wx * Lf), seq_sum((w * Lf) * Lf)
    sumlx, suml2 = _refine_levels(x, w, L, sumlx, suml2, ~zero, lo=-nmax, hi=nmax - 1,
                                  positive_only=False)
    scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    return np.where(zero, F(0), scale).astype(F), np.where(zero[:, None], 0, L + nmax)


def _refine_levels(x: np.ndarray, w: np.ndarray, L: np.ndarray, sumlx: np.ndarray,
                   suml2: np.ndarray, active: np.ndarray, *, lo: int | None, hi: int,
                   positive_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """The <= 5 coordinate-descent passes shared by make_q3_quants and make_qp_quants.

    Level ``L[:, i]`` (int ``[B, n]``, updated in place) moves to ``nearest_int(x*sl2/slx)``,
    clipped to ``[lo, hi]`` (no lower bound when ``lo`` is None), when that raises
    ``sumlx^2 / suml2``. The two C loops test ``sl2 > 0`` at different points: make_qp_quants
    (``positive_only``) on the old level's ``sl2`` before trying, make_q3_quants on the new one
    after; and make_qp_quants keeps ``L`` as uint8 (``& 0xFF``). Returns (sumlx, suml2) ``[B]``.
    """
    wx = w * x
    for _ in range(5):
        changed = np.zeros(len(x), dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, wxi, li = w[:, i], x[:, i], wx[:, i], L[:, i].astype(F)
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = nearest_int((xi * sl2) / slx)
            new_l = np.minimum(hi, new_l) if lo is None else _clip(new_l, lo, hi)
            nl = new_l.astype(F)
            slx2 = slx + wxi * nl
            sl22 = sl2 + (wi * nl) * nl
            acc = (active & (slx > 0) & ((sl2 if positive_only else sl22) > 0)
                   & (new_l != L[:, i]) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            L[:, i] = np.where(acc, new_l & 0xFF if positive_only else new_l, L[:, i])
            sumlx = np.where(acc, slx2, sumlx).astype(F)
            suml2 = np.where(acc, sl22, suml2).astype(F)
            changed |= acc
        active = active & changed
        if not active.any():
            break
    return sumlx, suml2


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                    nstep: int, use_mad: bool, v3: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (``v3=False``) / make_qkx3_quants (``v3=True``): affine search.

    Args: x, w float32 ``[B, n]`` (values and weights).
    Returns: (scale ``[B]``, the_min ``[B]`` (>= 0 except -0.0), L int32 ``[B, n]`` in 0..nmax).
    """
    n = x.shape[1]
    mn, mx = x[:, 0].copy(), x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, F(0), mn).astype(F)
    flat = (mx <= mn) if v3 else (mx == mn)
    mn0 = mn.copy()

    def err(scale: np.ndarray, mn: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = (scale[:, None] * lf + mn[:, None]) - x
        return seq_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = F(nmax) / (mx - mn)
    scale = (F(1) / iscale).astype(F)
    L = _clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = err(scale, mn, L.astype(F))
    for step in range(nstep + 1):
        iscale = ((F(rmin) + F(rdelta) * F(step)) + F(nmax)) / (mx - mn)
        la = _clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = la.astype(F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * lf), seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, F(0), this_min).astype(F)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F)
        cur = err(this_scale, this_min, lf)
        upd = (D > 0) & (cur < best)
        L = np.where(upd[:, None], la, L)
        best = np.where(upd, cur, best).astype(F)
        scale = np.where(upd, this_scale, scale).astype(F)
        mn = np.where(upd, this_min, mn).astype(F)
    scale = np.where(flat, F(0), scale).astype(F)
    the_min = np.where(flat, -mn0, -mn).astype(F)
    return scale, the_min, np.where(flat[:, None], 0, L)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights): quantize positive values to 0..nmax.

    Args: x, qw float32 ``[B, n]``.
    Returns: (super-scale float32 ``[B]``, L int32 ``[B, n]`` as stored in uint8 (mod 256)).
    """
    mx = np.zeros(len(x), dtype=F)
    for i in range(x.shape[1]):
        mx = np.where(mx > x[:, i], mx, x[:, i]).astype(F)
    zero = mx < GROUP_MAX_EPS
    iscale = F(nmax) / mx
    Lw = nearest_int(iscale[:, None] * x) & 0xFF
    diff = x - (F(1) / iscale)[:, None] * Lw.astype(F)
    best = seq_sum((qw * diff) * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        l = np.minimum(nmax, nearest_int(iscale_is[:, None] * x))
        diff = x - (F(1) / iscale_is)[:, None] * l.astype(F)
        mse = seq_sum((qw * diff) * diff)
        upd = mse < best
        best = np.where(upd, mse, best).astype(F)
        iscale = np.where(upd, iscale_is, iscale).astype(F)
    l = np.minimum(nmax, nearest_int(iscale[:, None] * x))
    L = l & 0xFF
    lf = l.astype(F)
    sumlx, suml2 = seq_sum((qw * x) * lf), seq_sum((qw * lf) * lf)
    sumlx, suml2 = _refine_levels(x, qw, L, sumlx, suml2, ~zero, lo=None, hi=nmax,
                                  positive_only=True)
    scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    return np.where(zero, F(0), scale).astype(F), np.where(zero[:, None], 0, L)


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """best_index_int8(n, values, x) for finite x: nearest entry of a sorted table, ties to
    the upper entry, the tie test ``x - v[mu-1] < v[mu] - x`` evaluated in fp32."""
    vals = np.asarray(values, dtype=F)
    n = len(vals)
    mu = np.ones(np.shape(x), dtype=np.int32)      # count of table entries <= x, clipped
    for k in range(1, n - 1):                         # to 1..n-1 (faster than searchsorted)
        mu += x >= vals[k]
    pick = np.where((x - vals[mu - 1]) < (vals[mu] - x), mu - 1, mu)
    pick = np.where(x <= vals[0], 0, pick)
    return np.where(x >= vals[n - 1], n - 1, pick).astype(np.int32)
