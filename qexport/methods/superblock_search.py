"""Loss-error-aware search for k-quant style superblock grids (LeanQuant_aff on Q2_K..Q6_K,
IQ4_XS), one 256-column superblock span at a time.

The decoded value is ``(d * sc) * T(q) - (dmin * m)``: fp16 ``d``/``dmin`` per superblock,
small integer ``sc``/``m`` per sub-block. The search minimises the same column-weighted error
as :mod:`grid_search` (``sum_j s_j (w_j - Q(w_j))^2``), in three stages:

| stage | with mins (Q2_K, Q4_K, Q5_K)               | signed scales (Q3_K, Q6_K, IQ4_XS)       |
|-------|--------------------------------------------|------------------------------------------|
| 1     | per sub-block, continuous ``(scale, min)``:| per sub-block, continuous signed scale:  |
|       | ``lo = min(w,0)(1-a)``, ``hi = lo + (max - | ``extreme / t * f`` for ``t`` the two end|
|       | lo)(1-b)``, ``a, b`` in ``linspace(0, 0.5, | levels, ``f`` in ``linspace(0.7, 1.15,   |
|       | grid)``, + weighted least squares          | 2 grid)``, + weighted least squares      |
| 2     | ``d = fp16(max scale / max sc)``, ``dmin = | ``d = fp16(signed extreme scale / sc     |
|       | fp16(max min / max m)``; per sub-block the | bound)``; per sub-block the best of      |
|       | best of 4 x 4 integers ``(sc, m)`` around  | 4 integers ``sc`` around ``scale / d``   |
|       | ``(scale / d, min / dmin)``                |                                          |
| 3     | weighted least squares ``(d, dmin)`` for   | weighted least squares ``d`` for the     |
|       | the chosen integers and codes, fp16, then  | chosen integers and codes, fp16, then    |
|       | stage 2 again; kept if the error dropped   | stage 2 again; kept if the error dropped |

``fit_minmax``'s superblock grid is evaluated too and kept per (row, superblock) when it is
better, so the result never loses to min-max on the weighted objective. Codes are nearest
values, as ``quantize_nearest`` picks them inside GPTQ.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qexport.errors import UnsupportedError
from qexport.grids import GridKind, GridSpec, SuperBlockGrid, fit_minmax

from .grid_search import (affine_err, codes_for, levels_of, ls_affine, ls_scale, nearest_T,
                          norm_weights, pick, scale_err, snap)

__all__ = ["search_superblock"]

_DELTAS = torch.tensor([-1.0, 0.0, 1.0, 2.0])


def _stage1_mins(x: Tensor, s: Tensor, maxq: int, grid: int, refine: int
                 ) -> tuple[Tensor, Tensor]:
    """Continuous per sub-block ``(a, b)`` of ``a q + b`` with ``b <= 0``: ``[R, G]`` each."""
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    t = torch.linspace(0.0, 0.5, grid)
    ta, tb = [u.reshape(1, 1, -1) for u in torch.meshgrid(t, t, indexing="ij")]
    lo = xmin.clamp(max=0) * (1 - ta)
    hi = lo + (xmax - lo).clamp_min(1e-12) * (1 - tb)
    a, b = (hi - lo) / maxq, lo
    err, a, b = pick(affine_err(x, s, a, b, maxq, False), a, b)
    for _ in range(refine):
        na, nb = ls_affine(x, s, codes_for(x, a, b, maxq, False))
        ok = torch.isfinite(na) & torch.isfinite(nb) & (na > 0)
        na, nb = torch.where(ok, na, a), torch.where(ok, nb, b).clamp(max=0)
        e2 = affine_err(x, s, na[..., None], nb[..., None], maxq, False)[..., 0]
        better = e2 < err
        err, a, b = (torch.where(better, e2, err), torch.where(better, na, a),
                     torch.where(better, nb, b))
    return a, -b


def _ints(v: torch.Tensor, unit: torch.Tensor, rng: tuple[int, int]) -> torch.Tensor:
    """``[R, G, 4]`` integer candidates around ``v / unit`` within ``rng``."""
    base = torch.where(unit != 0, torch.floor(v / torch.where(unit != 0, unit, 1.0)), 0.0)
    return torch.clamp(base[..., None] + _DELTAS, rng[0], rng[1])


def _ints_mins(spec: GridSpec, x: Tensor, s: Tensor, a: Tensor, mn: Tensor, d: Tensor,
               dmin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 2 with mins: best ``(sc, m)`` per sub-block for fixed ``d, dmin [R, 1]``."""
    sc_c = _ints(a, d.expand_as(a), spec.sub_scale_range)            # [R, G, 4]
    m_c = _ints(mn, dmin.expand_as(mn), spec.sub_min_range)
    sc_c = sc_c[..., :, None].expand(-1, -1, 4, 4).reshape(*a.shape, 16)
    m_c = m_c[..., None, :].expand(-1, -1, 4, 4).reshape(*a.shape, 16)
    eff, effm = d[..., None] * sc_c, dmin[..., None] * m_c
    err, sc, m = pick(affine_err(x, s, eff, -effm, spec.maxq, False), sc_c, m_c)
    return err, sc, m


def _ls_d_dmin(x: Tensor, s: Tensor, sc: Tensor, m: Tensor, q: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Weighted least squares ``x ~ d (sc q) - dmin m`` per row (the superblock)."""
    u = (sc[..., None] * q).flatten(1).double()
    v = (-m[..., None].expand_as(q)).flatten(1).double()
    w = s.expand_as(q).flatten(1).double()
    xx = x.flatten(1).double()
    suu, svv, suv = (w * u * u).sum(1), (w * v * v).sum(1), (w * u * v).sum(1)
    sux, svx = (w * u * xx).sum(1), (w * v * xx).sum(1)
    det = suu * svv - suv * suv
    ok = det > 1e-12 * suu * svv
    det = torch.where(ok, det, 1.0)
    d = torch.where(ok, (svv * sux - suv * svx) / det, torch.nan)
    dmin = torch.where(ok, (suu * svx - suv * sux) / det, torch.nan)
    return d.float()[:, None], dmin.float()[:, None]


def _search_mins(spec: GridSpec, x: Tensor, s: Tensor, grid: int, refine: int
                 ) -> tuple[Tensor, ...]:
    """Stages 1-3 with mins: ``(err [R, 1], d, sc [R, G], dmin, m)``."""
    a, mn = _stage1_mins(x, s, spec.maxq, grid, refine)
    hi_sc, hi_m = spec.sub_scale_range[1], spec.sub_min_range[1]
    d = snap(a.amax(1, keepdim=True) / hi_sc, spec.scale_dtype)
    dmin = snap(mn.amax(1, keepdim=True) / hi_m, spec.scale_dtype)
    err, sc, m = _ints_mins(spec, x, s, a, mn, d, dmin)
    tot = err.sum(1, keepdim=True)
    for _ in range(refine):
        q = codes_for(x, d * sc, -(dmin * m), spec.maxq, False)
        nd, ndm = _ls_d_dmin(x, s, sc, m, q)
        ok = torch.isfinite(nd) & torch.isfinite(ndm) & (nd > 0) & (ndm >= 0)
        nd = snap(torch.where(ok, nd, d), spec.scale_dtype)
        ndm = snap(torch.where(ok, ndm, dmin), spec.scale_dtype)
        e2, sc2, m2 = _ints_mins(spec, x, s, a, mn, nd, ndm)
        t2 = e2.sum(1, keepdim=True)
        better = t2 < tot
        tot, d, dmin = torch.where(better, t2, tot), torch.where(better, nd, d), \
            torch.where(better, ndm, dmin)
        sc, m = torch.where(better, sc2, sc), torch.where(better, m2, m)
    return tot, d, sc, dmin, m


def _stage1_signed(spec: GridSpec, x: Tensor, s: Tensor, grid: int, refine: int) -> Tensor:
    """Continuous signed scale per sub-block ``[R, G]``."""
    T = levels_of(spec)
    ext = x.gather(-1, torch.argmax(x.abs(), dim=-1, keepdim=True))   # [R, G, 1]
    f = torch.linspace(0.7, 1.15, 2 * grid)
    cand = torch.cat([ext / T[0] * f, ext / T[-1] * f], 2)
    err, a = pick(scale_err(x, s, cand, T), cand)
    for _ in range(refine):
        q = torch.where(a[..., None] != 0,
                        nearest_T(x / torch.where(a != 0, a, 1.0)[..., None], T), 0.0)
        na = ls_scale(x, s, q)
        na = torch.where(torch.isfinite(na), na, a)
        e2 = scale_err(x, s, na[..., None], T)[..., 0]
        better = e2 < err
        err, a = torch.where(better, e2, err), torch.where(better, na, a)
    return a


def _ints_signed(spec: GridSpec, x: Tensor, s: Tensor, a: Tensor, d: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Stage 2, signed: best integer ``sc`` per sub-block for a fixed ``d [R, 1]``."""
    T = levels_of(spec)
    sc_c = _ints(a, d.expand_as(a), spec.sub_scale_range)
    err, sc = pick(scale_err(x, s, d[..., None] * sc_c, T), sc_c)
    return err, sc


def _search_signed(spec: GridSpec, x: Tensor, s: Tensor, grid: int, refine: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Stages 1-3, signed scales: ``(err [R, 1], d [R, 1], sc [R, G])``."""
    T = levels_of(spec)
    a = _stage1_signed(spec, x, s, grid, refine)
    lo_sc, hi_sc = spec.sub_scale_range
    ext = a.gather(1, torch.argmax(a.abs(), dim=1, keepdim=True))      # [R, 1]
    d = snap(ext / (lo_sc if lo_sc < 0 else hi_sc), spec.scale_dtype)
    err, sc = _ints_signed(spec, x, s, a, d)
    tot = err.sum(1, keepdim=True)
    for _ in range(refine):
        eff = (d * sc)[..., None]
        q = torch.where(eff != 0, nearest_T(x / torch.where(eff != 0, eff, 1.0), T), 0.0)
        u = sc[..., None] * q
        num = (s * x * u).flatten(1).double().sum(1, keepdim=True)
        den = (s * u * u).flatten(1).double().sum(1, keepdim=True)
        nd = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.nan).float()
        nd = snap(torch.where(torch.isfinite(nd), nd, d), spec.scale_dtype)
        e2, sc2 = _ints_signed(spec, x, s, a, nd)
        t2 = e2.sum(1, keepdim=True)
        better = t2 < tot
        tot, d = torch.where(better, t2, tot), torch.where(better, nd, d)
        sc = torch.where(better, sc2, sc)
    return tot, d, sc


def _grid_error(spec: GridSpec, x: torch.Tensor, s: torch.Tensor, g: SuperBlockGrid
                ) -> torch.Tensor:
    """Weighted error per row ``[R, 1]`` of a (single-superblock) grid."""
    d = torch.from_numpy(g.d)
    sc = torch.from_numpy(g.sc.astype(np.float32))
    if g.dmin is None:
        return scale_err(x, s, (d * sc)[..., None], levels_of(spec))[..., 0].sum(1, True)
    effm = torch.from_numpy(g.dmin) * torch.from_numpy(g.m.astype(np.float32))
    return affine_err(x, s, (d * sc)[..., None], -effm[..., None], spec.maxq,
                      False)[..., 0].sum(1, keepdim=True)


def search_superblock(spec: GridSpec, W: np.ndarray, weights: np.ndarray | None, *,
                      grid: int = 10, refine: int = 2) -> SuperBlockGrid:
    """Loss-aware superblock grid of one span ``W [rows, super_size]`` (float32).

    Args:
        spec: a superblock spec; W: the span; weights: float ``[super_size]`` loss weights.
        grid: candidates per axis in stage 1 (see the module table); refine: LS rounds.
    Returns:
        SuperBlockGrid with ``d``/``dmin`` ``[rows, 1]``, ``sc``/``m`` ``[rows, G]`` int16.
    """
    if spec.kind != GridKind.SUPERBLOCK or W.shape[1] != spec.super_size:
        raise UnsupportedError(f"superblock search: expected a superblock spec and a span of "
                               f"{spec.super_size} columns (not {spec.name}, {W.shape[1]})")
    R = W.shape[0]
    G, gs = spec.super_size // spec.group_size, spec.group_size
    x = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)).reshape(R, G, gs)
    s = norm_weights(weights, spec.super_size).reshape(G, gs)
    mm = fit_minmax(spec, W)
    mm_err = _grid_error(spec, x, s, mm)
    if spec.sub_min_range is not None:
        tot, d, sc, dmin, m = _search_mins(spec, x, s, grid, refine)
    else:
        (tot, d, sc), dmin, m = _search_signed(spec, x, s, grid, refine), None, None
    use = (tot < mm_err).numpy()                                      # [R, 1]
    out_d = np.where(use, d.numpy(), mm.d).astype(np.float32)
    out_sc = np.where(use, sc.numpy().astype(np.int16), mm.sc).astype(np.int16)
    if dmin is None:
        return SuperBlockGrid(d=out_d, sc=out_sc)
    out_dmin = np.where(use, dmin.numpy(), mm.dmin).astype(np.float32)
    out_m = np.where(use, m.numpy().astype(np.int16), mm.m).astype(np.int16)
    return SuperBlockGrid(d=out_d, sc=out_sc, dmin=out_dmin, m=out_m)
