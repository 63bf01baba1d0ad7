"""The fixed grid of a TesseraQ tensor: min-max fit, the two neighbouring codes of every weight,
and the DST-tuned grid snapped back onto the GridSpec (numpy only).

TesseraQ's rounding variable chooses, for each weight, between two representable values: the
code ``c0`` below it and ``c0 + 1``. For every grid kind the decoded value of a code is
``e * T(code) + b`` with a per-group effective scale ``e`` and offset ``b``:

| spec kind      | e       | T(code)                   | b          | DST x f, snapped as          |
|----------------|---------|---------------------------|------------|------------------------------|
| affine / none  | scale   | code - code_offset        | 0          | scale' = dtype(scale * f)    |
| affine / int   | scale   | code - zero               | 0          | scale' as above, zero kept   |
| affine / float | scale   | code                      | min        | scale', min' = dtype(.. * f) |
| superblock     | d * sc  | code - code_offset, table | -dmin * m  | sc', m' = rint(.. * f)       |
| codebook table | scale   | table[code]               | 0          | scale' = dtype(scale * f)    |

(f = 2 sigmoid(v) per (row, group); superblocks keep d and dmin, so only the integer sub-scales
and sub-mins move: DST is off by default there, see the driver options.)

``c0`` is found in code units ``t = (w - b) / e (+ zero)``: ``floor(t)`` for uniform codes (for
affine specs exactly the ``w / scale`` that :func:`qexport.grids.quantize_nearest` rounds, so
``c0 + 1[frac > 0.5]`` *is* RTN) and a search in the sorted table otherwise, clamped to
``[0, maxq - 1]`` with ``frac`` clamped to ``[0, 1]`` (weights beyond the grid's ends get the end
code when rounded to nearest). ``v0`` / ``v1`` are the reference decoder's values of ``c0`` and
``c0 + 1``, so a hard choice reproduces :func:`qexport.grids.dequantize` bit for bit.
Free codebooks (learned per-group value tables) are not supported: their levels are not tied to
one scale for DST.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qexport.errors import UnsupportedError
from qexport.grids import (AffineGrid, CodebookGrid, Grid, GridKind, GridSpec, SuperBlockGrid,
                           ZeroDomain, concat_grids, dequantize, expand_groups, fit_minmax,
                           round_to_dtype)
from qexport.methods.result import check_spec_shape, span_len

__all__ = ["Neighbors", "fit_grid", "neighbors", "dst_grid", "group_index", "check_supported"]

_FP16_MAX = 65504.0
_FP16_TINY = float(np.float16(2.0 ** -24))


@dataclass
class Neighbors:
    """Per-weight rounding choice, all ``[out, in]``.

    Attributes:
        c0: uint8 lower code (``0 .. maxq - 1``).
        v0: float32 decoded value of ``c0``.
        v1: float32 decoded value of ``c0 + 1``.
        frac: float32 position of the weight between them, in ``[0, 1]`` (0 where v0 == v1).
    """

    c0: np.ndarray
    v0: np.ndarray
    v1: np.ndarray
    frac: np.ndarray


def check_supported(spec: GridSpec, name: str) -> None:
    """Raise UnsupportedError for grids TesseraQ cannot tune (free codebooks)."""
    if spec.kind == GridKind.CODEBOOK and (spec.free_codebook or spec.table is None):
        raise UnsupportedError(f"{name}: tesseraq expected an affine, superblock or fixed-table "
                               f"codebook spec (not the free codebook {spec.name}); use "
                               "--method leanquant-nu for free codebooks, or an affine / GGUF "
                               "grid with tesseraq")


def fit_grid(spec: GridSpec, W: np.ndarray, name: str = "tensor",
             weights: np.ndarray | None = None) -> Grid:
    """Initial grid of ``W`` (float32 ``[out, in]``), one fit per span: :func:`fit_minmax`, or
    with ``weights`` (float ``[in]``, e.g. the mean squared input of every column) LeanQuant's
    weighted-error search (:class:`qexport.methods.leanquant.SearchFitter`; min-max is its
    candidate 0, so the weighted error is never higher)."""
    check_supported(spec, name)
    check_spec_shape(spec, W.shape, name)
    L = span_len(spec, W.shape[1])
    if weights is None:
        parts = [fit_minmax(spec, W[:, c0:c0 + L]) for c0 in range(0, W.shape[1], L)]
    else:
        from qexport.methods.leanquant import SearchFitter
        fit = SearchFitter()
        parts = [fit(spec, W[:, c0:c0 + L], c0, weights[c0:c0 + L])
                 for c0 in range(0, W.shape[1], L)]
    return concat_grids(parts)


def group_index(spec: GridSpec, in_features: int) -> np.ndarray:
    """int64 ``[in]``: the group (column of the per-group arrays) of every column."""
    return np.arange(in_features) // spec.group_len(in_features)


def _expand(p: np.ndarray, spec: GridSpec, in_f: int) -> np.ndarray:
    return expand_groups(p, spec.group_len(in_f), in_f)


def _sub_per_super(spec: GridSpec) -> int:
    return spec.super_size // spec.group_size


def _effective(spec: GridSpec, grid: Grid, in_f: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column effective scale ``e`` and offset ``b`` (float32 ``[out, in]``) of a superblock
    or fixed-table codebook grid: value = ``e * T(code) + b``."""
    if isinstance(grid, SuperBlockGrid):
        per = _sub_per_super(spec)
        e = _expand(np.repeat(grid.d, per, axis=1) * grid.sc.astype(np.float32), spec, in_f)
        b = np.zeros_like(e)
        if grid.dmin is not None:
            b = -_expand(np.repeat(grid.dmin, per, axis=1) * grid.m.astype(np.float32), spec, in_f)
        return e, b
    return _expand(grid.scales, spec, in_f), np.zeros((grid.scales.shape[0], in_f), np.float32)


def _code_units(spec: GridSpec, grid: Grid, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(t, z)``: the weight in code units and the code of ``t == 0`` (float32, broadcastable to
    ``[out, in]``); the lower candidate code is ``floor(t) + z``."""
    in_f = W.shape[1]
    zero = np.float32(0.0)
    if isinstance(grid, AffineGrid):
        s = _expand(grid.scales, spec, in_f)
        if spec.zero == ZeroDomain.FLOAT:          # quantize_nearest: rint((w - min) / scale)
            m = _expand(grid.mins, spec, in_f)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(s > 0, (W - m) / s, 0.0).astype(np.float32), zero
        z = (_expand(grid.zeros, spec, in_f).astype(np.float32)   # rint(w / scale) + zero
             if spec.zero == ZeroDomain.INT else np.float32(spec.code_offset))
        return (W / s).astype(np.float32), z
    e, b = _effective(spec, grid, in_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(e != 0, (W - b) / e, 0.0).astype(np.float32)
    if spec.table is None:
        return u, np.float32(spec.code_offset)
    table = np.asarray(spec.table, dtype=np.float32)
    if np.any(np.diff(table) <= 0):
        raise UnsupportedError(f"spec {spec.name}: tesseraq expected an ascending table")
    k = np.clip(np.searchsorted(table, u, side="right") - 1, 0, spec.maxq - 1)
    lo, hi = table[k], table[k + 1]
    return (k + (u - lo) / (hi - lo)).astype(np.float32), zero


def neighbors(spec: GridSpec, grid: Grid, W: np.ndarray) -> Neighbors:
    """The two candidate codes of every weight of ``W`` (float32 ``[out, in]``) on ``grid``."""
    W = np.asarray(W, dtype=np.float32)
    t, z = _code_units(spec, grid, W)
    base = np.floor(t)
    code = base + z
    maxq = spec.maxq
    frac = np.where(code < 0, 0.0, np.where(code > maxq - 1, 1.0, t - base))
    c0 = np.clip(code, 0, maxq - 1).astype(np.uint8)
    v0 = dequantize(c0, grid, spec)
    v1 = dequantize(c0 + np.uint8(1), grid, spec)
    frac = np.where(v0 == v1, 0.0, np.clip(frac, 0.0, 1.0)).astype(np.float32)
    return Neighbors(c0=c0, v0=v0, v1=v1, frac=frac)


def _snap_scale(x: np.ndarray, dtype: str) -> np.ndarray:
    """Scales rounded to ``dtype`` with their sign kept (GGUF's Q4_0/Q5_0/Q8_0 ``d`` may be
    negative) and their magnitude in ``[fp16 tiny, fp16 max]``."""
    sign = np.where(x < 0, np.float32(-1.0), np.float32(1.0))
    a = np.abs(x)
    if dtype == "fp16":
        a = np.clip(a, _FP16_TINY, _FP16_MAX)
        return sign * np.maximum(round_to_dtype(a, dtype), np.float32(_FP16_TINY))
    return sign * round_to_dtype(np.maximum(a, np.float32(1e-30)), dtype)


def _rint_clip(x: np.ndarray, rng: tuple[int, int]) -> np.ndarray:
    return np.clip(np.rint(x), rng[0], rng[1]).astype(np.int16)


def dst_grid(spec: GridSpec, grid: Grid, f: np.ndarray) -> Grid:
    """The grid with every group's decoded values multiplied by ``f`` (float32
    ``[out, n_groups]``, positive), snapped onto ``spec`` (see the module table). ``f == 1``
    returns the same parameters."""
    f = np.asarray(f, dtype=np.float32)
    dt = spec.scale_dtype
    if isinstance(grid, AffineGrid):
        zeros = None if grid.zeros is None else grid.zeros.copy()
        mins = None if grid.mins is None else round_to_dtype(grid.mins * f, dt)
        return AffineGrid(scales=_snap_scale(grid.scales * f, dt), zeros=zeros, mins=mins)
    if isinstance(grid, SuperBlockGrid):
        sc = _rint_clip(grid.sc.astype(np.float32) * f, spec.sub_scale_range)
        m = None if grid.m is None else _rint_clip(grid.m.astype(np.float32) * f,
                                                   spec.sub_min_range)
        dmin = None if grid.dmin is None else grid.dmin.copy()
        return SuperBlockGrid(d=grid.d.copy(), sc=sc, dmin=dmin, m=m)
    if not isinstance(grid, CodebookGrid) or grid.scales is None:
        raise UnsupportedError(f"spec {spec.name}: DST expected a scaled grid")
    return CodebookGrid(scales=round_to_dtype(grid.scales * f, dt))
