"""Fitting grid parameters to weights and rounding weights onto a fitted grid (numpy only).

These are the building blocks every frontend method uses:

- :func:`fit_minmax` fits the parameters of one *span* of columns (a group, or a superblock
  for k-quant specs) from the weights in it, already snapped onto the spec's representable set
  (fp16 scales, integer sub-scales), so codes computed against them are exact for what is
  stored.
- :func:`quantize_nearest` rounds columns to codes on a fitted grid (round-to-nearest in the
  grid's own formula; codebooks take the nearest table value).

RTN is ``fit_minmax`` + ``quantize_nearest`` over every span; GPTQ calls the same two per
column inside its error-feedback loop.
"""
from __future__ import annotations

import numpy as np

from .errors import GridError
from .grid import AffineGrid, CodebookGrid, Grid, SuperBlockGrid, _table_value
from .spec import GridKind, GridSpec, ZeroDomain, round_to_dtype

__all__ = ["fit_minmax", "quantize_nearest", "span_groups", "FP16_TINY"]

FP16_TINY = float(np.float16(2.0 ** -24))   # smallest positive fp16 (subnormal)
_FP16_MAX = 65504.0


def span_groups(spec: GridSpec, ncols: int) -> int:
    """Groups in a span of ``ncols`` columns (the last group may be ragged)."""
    gl = spec.group_len(ncols) if spec.group_size == -1 else spec.group_size
    return -(-ncols // gl)


def _grouped(W: np.ndarray, gl: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``W [rows, n]`` into ``[rows, n_groups, gl]`` padded with NaN, plus a valid mask."""
    rows, n = W.shape
    ng = -(-n // gl)
    pad = ng * gl - n
    Wp = np.pad(W.astype(np.float32), ((0, 0), (0, pad)), constant_values=np.nan)
    Wg = Wp.reshape(rows, ng, gl)
    return Wg, ~np.isnan(Wg)


def _safe_scale(s: np.ndarray, dtype: str) -> np.ndarray:
    """Round positive scales to ``dtype``, keeping them in (0, max]."""
    s = np.clip(s, FP16_TINY if dtype == "fp16" else 1e-30, _FP16_MAX if dtype == "fp16" else None)
    return np.maximum(round_to_dtype(s, dtype), np.float32(FP16_TINY))


def _fit_affine(spec: GridSpec, W: np.ndarray) -> AffineGrid:
    gl = spec.group_len(W.shape[1]) if spec.group_size == -1 else spec.group_size
    Wg, _ = _grouped(W, gl)
    xmin, xmax = np.nanmin(Wg, axis=2), np.nanmax(Wg, axis=2)
    maxq = spec.maxq
    if spec.zero == ZeroDomain.NONE:             # GPTQ's symmetric min-max
        amax = np.maximum(np.abs(xmin), np.abs(xmax))
        amax = np.where(amax == 0, 1.0, amax)
        scale = _safe_scale(2 * amax / maxq, spec.scale_dtype)
        return AffineGrid(scales=scale)
    if spec.zero == ZeroDomain.INT:              # GPTQ's asymmetric min-max, 0 kept in range
        lo, hi = np.minimum(xmin, 0), np.maximum(xmax, 0)
        both0 = (lo == 0) & (hi == 0)
        lo, hi = np.where(both0, -1.0, lo), np.where(both0, 1.0, hi)
        scale = _safe_scale((hi - lo) / maxq, spec.scale_dtype)
        zr = spec.zero_range
        zero = np.clip(np.rint(-lo / scale), zr[0], zr[1]).astype(np.uint8)
        return AffineGrid(scales=scale, zeros=zero)
    # FLOAT domain (Q4_1 style): x = d * q + m with m = min
    m = round_to_dtype(xmin, spec.scale_dtype)
    d = round_to_dtype((xmax - m) / maxq, spec.scale_dtype)
    # a nonzero range whose step underflows to 0 would put every weight on the min
    d = np.where((d == 0) & (xmax > m), np.float32(FP16_TINY), d)
    return AffineGrid(scales=np.maximum(d, 0).astype(np.float32), mins=m)


def _signed_extreme(Wg: np.ndarray) -> np.ndarray:
    """Per group, the (signed) value of largest magnitude; NaN padding ignored."""
    a = np.where(np.isnan(Wg), 0.0, Wg)
    idx = np.argmax(np.abs(a), axis=2)
    return np.take_along_axis(a, idx[..., None], axis=2)[..., 0]


def _fit_superblock(spec: GridSpec, W: np.ndarray) -> SuperBlockGrid:
    rows, n = W.shape
    if n % spec.super_size:
        raise GridError(f"superblock span expected a multiple of {spec.super_size} columns "
                        f"(found {n})")
    Wg, _ = _grouped(W, spec.group_size)                   # [rows, ng, gs]
    per = spec.super_size // spec.group_size
    ns = n // spec.super_size
    lo_sc, hi_sc = spec.sub_scale_range
    if spec.sub_min_range is not None:                     # Q2_K / Q4_K / Q5_K: x = s*q - mn
        mn = -np.minimum(Wg.min(axis=2), 0)                # >= 0
        s = (Wg.max(axis=2) + mn) / spec.maxq
        d = round_to_dtype(s.reshape(rows, ns, per).max(axis=2) / hi_sc, spec.scale_dtype)
        lo_m, hi_m = spec.sub_min_range
        dmin = round_to_dtype(mn.reshape(rows, ns, per).max(axis=2) / hi_m, spec.scale_dtype)
        sc = _int_codes(s, np.repeat(d, per, axis=1), lo_sc, hi_sc)
        m = _int_codes(mn, np.repeat(dmin, per, axis=1), lo_m, hi_m)
        return SuperBlockGrid(d=d, sc=sc, dmin=dmin, m=m)
    # signed sub-scales (Q3_K, Q6_K, IQ4_XS): the extreme value maps to the most negative level
    levels = _table_value(spec, np.arange(spec.maxq + 1, dtype=np.uint8))
    lowest = float(levels[np.argmax(np.abs(levels))])
    s = _signed_extreme(Wg) / lowest                       # [rows, ng], signed
    sext = _signed_extreme(s.reshape(rows, ns, per))       # [rows, ns]
    den = lo_sc if lo_sc < 0 else hi_sc
    d = round_to_dtype(sext / den, spec.scale_dtype)
    sc = _int_codes(s, np.repeat(d, per, axis=1), lo_sc, hi_sc)
    return SuperBlockGrid(d=d, sc=sc)


def _int_codes(x: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d != 0, np.rint(x / d), 0)
    return np.clip(q, lo, hi).astype(np.int16)


def _fit_codebook(spec: GridSpec, W: np.ndarray) -> CodebookGrid:
    gl = spec.group_len(W.shape[1]) if spec.group_size == -1 else spec.group_size
    Wg, _ = _grouped(W, gl)
    if spec.free_codebook:                                  # uniform init between min and max
        lo, hi = np.nanmin(Wg, axis=2), np.nanmax(Wg, axis=2)
        t = np.linspace(0.0, 1.0, 2 ** spec.bits, dtype=np.float32)
        vals = lo[..., None] + (hi - lo)[..., None] * t
        return CodebookGrid(values=round_to_dtype(vals, spec.scale_dtype))
    table = np.asarray(spec.table, dtype=np.float32)
    lowest = float(table[np.argmax(np.abs(table))])
    return CodebookGrid(scales=round_to_dtype(_signed_extreme(Wg) / lowest, spec.scale_dtype))


def fit_minmax(spec: GridSpec, W: np.ndarray) -> Grid:
    """Fit min-max parameters for the columns ``W [rows, span]`` (float32).

    Returns a grid with ``span_groups(spec, span)`` groups whose parameters are already
    representable (fp16-rounded scales, clamped integer sub-scales).
    """
    W = np.asarray(W, dtype=np.float32)
    if spec.kind == GridKind.AFFINE:
        return _fit_affine(spec, W)
    if spec.kind == GridKind.SUPERBLOCK:
        return _fit_superblock(spec, W)
    return _fit_codebook(spec, W)


def _levels(spec: GridSpec, grid: Grid, gidx: np.ndarray) -> np.ndarray:
    """Every representable value per (row, column): float32 ``[rows, k, 2**bits]``."""
    codes = np.arange(spec.maxq + 1, dtype=np.uint8)
    if isinstance(grid, CodebookGrid) and grid.values is not None:
        return grid.values[:, gidx, :]
    if isinstance(grid, CodebookGrid):
        return grid.scales[:, gidx, None] * _table_value(spec, codes)
    per = spec.super_size // spec.group_size
    eff = np.repeat(grid.d, per, axis=1) * grid.sc.astype(np.float32)
    x = eff[:, gidx, None] * _table_value(spec, codes)
    if grid.dmin is not None:
        effm = np.repeat(grid.dmin, per, axis=1) * grid.m.astype(np.float32)
        x = x - effm[:, gidx, None]
    return x


def quantize_nearest(spec: GridSpec, grid: Grid, W: np.ndarray, col0: int = 0,
                     span: int | None = None) -> np.ndarray:
    """Round ``W [rows, k]`` (columns ``col0 .. col0+k`` of the grid's span) to uint8 codes.

    Affine grids round ``w / scale`` (GPTQ's rule); superblock and codebook grids pick the
    representable value nearest to ``w`` (ties to the lower code).
    """
    W = np.asarray(W, dtype=np.float32)
    rows, k = W.shape
    gl = spec.group_size if spec.group_size > 0 else (span or k)
    gidx = (col0 + np.arange(k)) // gl
    if isinstance(grid, AffineGrid):
        s = grid.scales[:, gidx]
        if spec.zero == ZeroDomain.FLOAT:
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(s > 0, np.rint((W - grid.mins[:, gidx]) / s), 0)
            return np.clip(q, 0, spec.maxq).astype(np.uint8)
        z = grid.zeros[:, gidx].astype(np.float32) if spec.zero == ZeroDomain.INT \
            else np.float32(spec.code_offset)
        return np.clip(np.rint(W / s) + z, 0, spec.maxq).astype(np.uint8)
    lv = _levels(spec, grid, gidx)                          # [rows, k, K]
    return np.argmin(np.abs(lv - W[..., None]), axis=-1).astype(np.uint8)


def dequantize_span(spec: GridSpec, grid: Grid, codes: np.ndarray, col0: int = 0,
                    span: int | None = None) -> np.ndarray:
    """Values of ``codes [rows, k]`` at columns ``col0..col0+k`` of a span grid (float32)."""
    rows, k = codes.shape
    gl = spec.group_size if spec.group_size > 0 else (span or k)
    gidx = (col0 + np.arange(k)) // gl
    if isinstance(grid, AffineGrid):
        s = grid.scales[:, gidx]
        if spec.zero == ZeroDomain.NONE:
            return s * _table_value(spec, codes)
        if spec.zero == ZeroDomain.INT:
            return s * (codes.astype(np.int32) - grid.zeros[:, gidx]).astype(np.float32)
        return s * codes.astype(np.float32) + grid.mins[:, gidx]
    lv = _levels(spec, grid, gidx)
    return np.take_along_axis(lv, codes[..., None].astype(np.intp), axis=-1)[..., 0]
