"""Loss-error-aware grid search (LeanQuant_aff) for one span: affine grids and fixed codebooks.

Every search minimises the column-weighted squared rounding error of a span,
``sum_j s_j (w_j - Q(w_j))^2`` per row (and group), with ``s_j = U_jj^-p`` the loss weights GPTQ
hands to its span fitter; ``Q`` rounds to the nearest representable value of a *candidate*
grid whose parameters are already snapped (fp16 scales, integer zeros). The min-max grid of
``qexport.grids.fit_minmax`` is always candidate 0, so the chosen grid is never worse than it on
the weighted objective.

| spec kind           | candidates per row-group (``grid`` = ``grid_points``)       |
|---------------------|-------------------------------------------------------------|
| affine/none (sym)   | ``scale = (2 max|w| / maxq) f``, f in linspace(0.3, 1.1,    |
|                     | 4 grid); GGUF (Q4_0/Q5_0/Q8_0, whose ``d`` is signed) also  |
|                     | ``scale = (signed extreme / t) f``, t the lowest and highest |
|                     | level, f in linspace(0.7, 1.15, 2 grid): llama.cpp's own    |
|                     | ``d = max / -8`` is the t = -8, f = 1 candidate             |
| affine/int (asym)   | ``lo = min(w, 0)(1 - a)``, ``hi = max(w, 0)(1 - b)``, a, b  |
|                     | in linspace(0, 0.6, grid) (grid^2 pairs) -> fp16 ``scale =  |
|                     | (hi - lo) / maxq``, integer ``zero = round(-lo / scale)``   |
| affine/float (min)  | ``lo = min + a R``, ``hi = max - b R`` (R the range), a, b  |
|                     | in linspace(0, 0.3, grid) -> fp16 scale and min             |
| codebook, fixed     | ``scale = (signed extreme / t) f``, t the table's two end   |
| table (IQ4_NL)      | values, f in linspace(0.7, 1.15, 2 grid)                    |

Then ``refine`` rounds of: codes of the best grid -> weighted least-squares parameters for
those codes (scale; scale and zero / min) -> snap (fp16, integer zero) -> keep if the weighted
error dropped. All arithmetic
is float32 torch, the candidate axis chunked to bound memory. The paper's search (T=2048
interval pairs in a fused GPU kernel) is not reproduced; this grid plus least squares is the
documented CPU substitute.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qexport.errors import UnsupportedError
from qexport.grids import (AffineGrid, CodebookGrid, Grid, GridKind, GridSpec, ZeroDomain,
                           dequantize_span, fit_minmax, quantize_nearest)
from qexport.grids.fit import FP16_TINY

__all__ = ["search_span", "span_error", "norm_weights", "snap", "nearest_T", "scale_err",
           "affine_err", "codes_for", "ls_scale", "ls_affine", "levels_of", "pick", "CHUNK"]

CHUNK = 1 << 22                     # elements per candidate chunk
_FP16_MAX = 65504.0


def norm_weights(weights: np.ndarray | None, n: int) -> torch.Tensor:
    """float32 ``[n]`` loss weights scaled to max 1 (all ones when missing or all zero)."""
    if weights is None:
        return torch.ones(n)
    s = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    top = float(s.max()) if s.numel() else 0.0
    return (s / top).float() if top > 0 else torch.ones(n)


def snap(x: torch.Tensor, dtype: str, positive: bool = False) -> torch.Tensor:
    """Round to the nearest ``dtype`` value (float32 result); ``positive`` keeps it >= the
    smallest fp16 subnormal, as ``fit_minmax`` does for affine scales."""
    if dtype == "fp16":
        x = x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()
    elif dtype == "bf16":
        x = x.to(torch.bfloat16).float()
    return x.clamp_min(FP16_TINY) if positive else x


def nearest_T(t: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Nearest level of the sorted level table ``T [K]`` to ``t`` (integer tables: rint+clamp,
    GPTQ's rounding; others: midpoint buckets)."""
    if bool((T[1:] - T[:-1] == 1).all()):
        return torch.clamp(torch.round(t), float(T[0]), float(T[-1]))
    mids = (T[1:] + T[:-1]) / 2
    return T[torch.bucketize(t, mids)]


def _chunks(rows: int, n: int, C: int) -> tuple[range, int]:
    step = max(1, CHUNK // max(1, rows * n))
    return range(0, C, step), step


def scale_err(x: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, T: torch.Tensor
              ) -> torch.Tensor:
    """Weighted error of scale-only grids ``value = scale * T[k]``.

    Args:
        x: float32 ``[R, G, g]`` weights; s: float32 ``[G, g]`` loss weights.
        scale: float32 ``[R, G, C]`` candidate scales (0 decodes every weight to 0).
        T: float32 ``[K]`` sorted levels.
    Returns:
        float32 ``[R, G, C]``.
    """
    R, G, g = x.shape
    C = scale.shape[2]
    out = torch.empty(R, G, C)
    starts, step = _chunks(R, G * g, C)
    for c0 in starts:
        sc = scale[:, :, c0:c0 + step, None]
        safe = torch.where(sc != 0, sc, 1.0)
        q = torch.where(sc != 0, nearest_T(x[:, :, None, :] / safe, T), 0.0)
        e = (x[:, :, None, :] - sc * q) ** 2
        out[:, :, c0:c0 + step] = (e * s[None, :, None, :]).sum(-1)
    return out


def affine_err(x: torch.Tensor, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               maxq: int, int_zero: bool) -> torch.Tensor:
    """Weighted error of ``value = a * q + b``, ``q`` in ``0..maxq`` nearest (``a <= 0``
    decodes every weight to ``b``).

    ``int_zero``: ``b = -a * z`` with integer ``z`` and GPTQ's ``q = rint(w / a) + z``.
    Shapes as :func:`scale_err` (``a``, ``b`` ``[R, G, C]``).
    """
    R, G, g = x.shape
    C = a.shape[2]
    out = torch.empty(R, G, C)
    starts, step = _chunks(R, G * g, C)
    xx = x[:, :, None, :]
    for c0 in starts:
        aa, bb = a[:, :, c0:c0 + step, None], b[:, :, c0:c0 + step, None]
        pos = aa > 0
        aa1 = torch.where(pos, aa, 1.0)
        if int_zero:
            z = torch.round(-bb / aa1)
            q = torch.clamp(torch.round(xx / aa1) + z, 0, maxq)
            v = aa * (q - z)
        else:
            q = torch.where(pos, torch.clamp(torch.round((xx - bb) / aa1), 0, maxq), 0.0)
            v = aa * q + bb
        out[:, :, c0:c0 + step] = (((xx - v) ** 2) * s[None, :, None, :]).sum(-1)
    return out


def ls_scale(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares scale for fixed levels ``q [R, G, g]``: ``[R, G]`` (nan if 0)."""
    num = (s * x * q).sum(-1)
    den = (s * q * q).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.nan)


def ls_affine(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares ``x ~ a q + b`` per ``[R, G]`` (float64 sums; nan if singular)."""
    x, s, q = x.double(), s.double(), q.double()
    sw, sq, sqq = s.sum(-1), (s * q).sum(-1), (s * q * q).sum(-1)
    sx, sqx = (s * x).sum(-1), (s * q * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq
    det = torch.where(ok, det, 1.0)
    a = torch.where(ok, (sw * sqx - sq * sx) / det, torch.nan)
    b = torch.where(ok, (sqq * sx - sq * sqx) / det, torch.nan)
    return a.float(), b.float()


def levels_of(spec: GridSpec) -> torch.Tensor:
    if spec.table is not None:
        return torch.tensor(sorted(spec.table), dtype=torch.float32)
    return torch.arange(spec.maxq + 1, dtype=torch.float32) - spec.code_offset


def pick(err: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per ``[R, G]`` the candidate with the smallest error: ``(err, *params)``."""
    k = torch.argmin(err, dim=2, keepdim=True)
    return tuple(p.gather(2, k)[..., 0] for p in (err,) + params)


def codes_for(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, maxq: int, int_zero: bool
              ) -> torch.Tensor:
    """Nearest codes ``q [R, G, g]`` (float) of ``a q + b`` for ``a, b [R, G]``."""
    pos = a[..., None] > 0
    a1 = torch.where(pos, a[..., None], 1.0)
    if int_zero:
        z = torch.round(-b[..., None] / a1)
        return torch.clamp(torch.round(x / a1) + z, 0, maxq)
    return torch.where(pos, torch.clamp(torch.round((x - b[..., None]) / a1), 0, maxq), 0.0)


def _search_scale(spec: GridSpec, x: Tensor, s: Tensor, base: Tensor, factors: Tensor,
                  refine: int, positive: bool) -> Tensor:
    """Scale-only search (symmetric affine, fixed table); ``base [R, G, B]`` per base."""
    T = levels_of(spec)
    cand = (base[:, :, :, None] * factors).reshape(base.shape[0], base.shape[1], -1)
    cand = snap(cand, spec.scale_dtype, positive)
    err, sc = pick(scale_err(x, s, cand, T), cand)
    for _ in range(refine):
        q = torch.where(sc[..., None] != 0,
                        nearest_T(x / torch.where(sc != 0, sc, 1.0)[..., None], T), 0.0)
        new = ls_scale(x, s, q)
        new = snap(torch.where(torch.isfinite(new), new, sc), spec.scale_dtype, positive)
        e2 = scale_err(x, s, new[..., None], T)[..., 0]
        better = e2 < err
        err, sc = torch.where(better, e2, err), torch.where(better, new, sc)
    return sc


def _signed_scales(spec: GridSpec) -> bool:
    """Whether a symmetric affine spec's scale may be negative in the search: GGUF's legacy
    types store ``d`` signed and llama.cpp maps each block's signed extreme to the lowest
    level; other targets are only searched with positive scales (their kernels are only
    exercised with those)."""
    return spec.zero == ZeroDomain.NONE and spec.name.startswith("gguf-")


def _affine_params(spec: GridSpec, a: torch.Tensor, b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap continuous ``(a, b)`` of ``a q + b``: INT -> fp16 scale, integer zero (b=-a z);
    FLOAT -> fp16 scale >= 0 and fp16 min."""
    if spec.zero == ZeroDomain.INT:
        a = snap(torch.where(a > 0, a, FP16_TINY), spec.scale_dtype, True)
        zr = spec.zero_range
        z = torch.clamp(torch.round(-b / a), zr[0], zr[1])
        return a, -a * z
    m = snap(b, spec.scale_dtype)
    return snap(a.clamp_min(0), spec.scale_dtype).clamp_min(FP16_TINY), m


def _minmax_ab(spec: GridSpec, g: AffineGrid) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.from_numpy(g.scales)[..., None]
    if spec.zero == ZeroDomain.INT:
        return a, -a * torch.from_numpy(g.zeros.astype(np.float32))[..., None]
    return a, torch.from_numpy(g.mins)[..., None]


def _search_affine(spec: GridSpec, W: np.ndarray, s: torch.Tensor, grid: int, refine: int
                   ) -> AffineGrid:
    x = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32))[:, None, :]
    mm = fit_minmax(spec, W)
    if spec.zero == ZeroDomain.NONE:
        f = torch.cat([torch.ones(1), torch.linspace(0.3, 1.1, 4 * grid)])
        base = torch.from_numpy(mm.scales)[..., None]                 # min-max scale first
        cand = (base[..., None] * f).flatten(2)
        if _signed_scales(spec):
            T = levels_of(spec)
            ext = x.gather(-1, torch.argmax(x.abs(), dim=-1, keepdim=True))
            ends = torch.cat([ext / T[0], ext / T[-1]], 2)
            cand = torch.cat([cand, (ends[..., None] * torch.linspace(0.7, 1.15, 2 * grid))
                              .flatten(2)], 2)
        sc = _search_scale(spec, x, s, cand, torch.ones(1), refine, not _signed_scales(spec))
        return AffineGrid(scales=sc.numpy())
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    t = torch.linspace(0.0, 0.6 if spec.zero == ZeroDomain.INT else 0.3, grid)
    ta, tb = [u.reshape(1, 1, -1) for u in torch.meshgrid(t, t, indexing="ij")]
    if spec.zero == ZeroDomain.INT:
        lo0, hi0 = xmin.clamp(max=0), xmax.clamp(min=0)
        lo, hi = lo0 * (1 - ta), hi0 * (1 - tb)
        hi = torch.where(hi > lo, hi, lo + 1.0)
    else:
        rng = xmax - xmin
        lo, hi = xmin + ta * rng, xmax - tb * rng
    a0, b0 = _minmax_ab(spec, mm)
    maxq = spec.maxq
    la, lb = _affine_params(spec, (hi - lo) / maxq, lo)
    a, b = torch.cat([a0, la], 2), torch.cat([b0, lb], 2)
    a, b = _search_range_ab(spec, x, s, a, b, refine)
    if spec.zero == ZeroDomain.INT:
        z = torch.round(-b / a).clamp(*spec.zero_range)
        return AffineGrid(scales=a.numpy(), zeros=z.numpy().astype(np.uint8))
    return AffineGrid(scales=a.numpy(), mins=b.numpy())


def _search_range_ab(spec: GridSpec, x: Tensor, s: Tensor, a: Tensor, b: Tensor, refine: int
                     ) -> tuple[Tensor, Tensor]:
    """:func:`_search_range` on already-snapped candidate parameters."""
    maxq, int_zero = spec.maxq, spec.zero == ZeroDomain.INT
    err, a, b = pick(affine_err(x, s, a, b, maxq, int_zero), a, b)
    for _ in range(refine):
        q = codes_for(x, a, b, maxq, int_zero)
        na, nb = ls_affine(x, s, q)
        ok = torch.isfinite(na) & torch.isfinite(nb) & (na > 0)
        na, nb = _affine_params(spec, torch.where(ok, na, a), torch.where(ok, nb, b))
        e2 = affine_err(x, s, na[..., None], nb[..., None], maxq, int_zero)[..., 0]
        better = e2 < err
        err, a, b = (torch.where(better, e2, err), torch.where(better, na, a),
                     torch.where(better, nb, b))
    return a, b


def _search_table(spec: GridSpec, W: np.ndarray, s: torch.Tensor, grid: int, refine: int
                  ) -> CodebookGrid:
    x = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32))[:, None, :]
    T = levels_of(spec)
    mm = torch.from_numpy(fit_minmax(spec, W).scales)[..., None]      # [R, 1, 1]
    idx = torch.argmax(x.abs(), dim=-1, keepdim=True)
    ext = x.gather(-1, idx)                                           # signed extreme
    base = torch.cat([mm, ext / T[0], ext / T[-1]], 2)
    f = torch.linspace(0.7, 1.15, 2 * grid)
    cand = torch.cat([mm, (base[..., 1:, None] * f).flatten(2)], 2)
    sc = _search_scale(spec, x, s, cand, torch.ones(1), refine, False)
    return CodebookGrid(scales=sc.numpy())


def search_span(spec: GridSpec, W: np.ndarray, weights: np.ndarray | None, *, grid: int = 10,
                refine: int = 2) -> Grid:
    """Loss-aware grid of one span ``W [rows, span]`` (float32) for affine and fixed-table
    codebook specs (superblocks: :mod:`superblock_search`). ``weights``: float ``[span]``."""
    s = norm_weights(weights, W.shape[1])[None, :]
    if spec.kind == GridKind.AFFINE:
        return _search_affine(spec, W, s, grid, refine)
    if spec.kind == GridKind.CODEBOOK and not spec.free_codebook:
        return _search_table(spec, W, s, grid, refine)
    raise UnsupportedError(f"grid search: spec {spec.name} ({spec.kind.value}) is handled "
                           "elsewhere (free codebooks: leanquant_nu; superblocks: "
                           "superblock_search)")


def span_error(spec: GridSpec, grid: Grid, W: np.ndarray, weights: np.ndarray | None) -> float:
    """``sum_j s_j (w_j - Q(w_j))^2`` of ``W [rows, span]`` on ``grid`` (nearest codes),
    with the normalised loss weights: the quantity :func:`search_span` minimises."""
    codes = quantize_nearest(spec, grid, W, 0, span=W.shape[1])
    v = dequantize_span(spec, grid, codes, 0, span=W.shape[1])
    s = norm_weights(weights, W.shape[1]).numpy()
    return float((((W - v) ** 2) * s).sum(dtype=np.float64))
