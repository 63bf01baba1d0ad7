"""Sub-scale re-fit of k-quant super-blocks (``--refit N --refit-sub``).

:func:`qexport.methods.refit.refit_scales` holds a super-block's integer sub-scales ``sc`` and
sub-mins ``m`` fixed and re-fits only ``d`` / ``dmin``. But the sub-scales were chosen up
front, from the weights *before* GPTQ's error feedback moved them (act-order needs static
grids). This re-fit re-chooses the integers too, for the codes GPTQ picked:

| step | what                                                                  | per row         |
|------|-----------------------------------------------------------------------|-----------------|
| 1    | Hessian least squares of the continuous per-sub-block scale           | ``n_sub`` (+    |
|      | ``s = d * sc`` (and min ``mu = dmin * m``): ``theta = M^-1 B^T H w``  | ``n_sub`` mins) |
|      | with ``M = B^T H B`` (codes fixed)                                     |                 |
| 2    | ``d`` (``dmin``) per super-block: the fp16 value that puts the largest |                 |
|      | ``s`` (``mu``) on the end of ``spec.sub_scale_range`` (``sub_min_range``) |              |
| 3    | the integers: GPTQ's rounding with error feedback on ``theta`` under  |                 |
|      | ``M`` (Cholesky of ``M^-1``), each one clamped to its range            |                 |
| 4    | ``d`` / ``dmin`` least squares for those integers (``refit_scales``)   |                 |

Each row keeps the best by the layer objective ``(w - q)^T H (w - q)`` of its input grid,
the ``d``/``dmin``-only re-fit and this one, so it never does worse than either. Grids other
than super-blocks (Q4_0, IQ4_NL, ... in the same recipe) get :func:`refit_scales` unchanged.

Written by hand: no library fits k-quant sub-scales to a Hessian.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qexport.grids import Grid, GridSpec, SuperBlockGrid
from qexport.grids.spec import round_to_dtype

from .refit import _RIDGE, _normal_equations, _table, refit_rows, refit_scales

__all__ = ["refit_subscales"]

#: bytes of float64 ``[rows, P, P]`` normal matrices held at once
_MEM = 256 * 2 ** 20


def _super_unit(theta: np.ndarray, per: int, rng: tuple[int, int], dtype: str) -> np.ndarray:
    """``[R, n_super]`` positive unit (``d`` or ``dmin``) per super-block so that every
    continuous value of ``theta [R, n_sub]`` lies in ``unit * [lo, hi]`` (fp16-representable;
    0 where the whole super-block is 0)."""
    lo, hi = rng
    t = theta.reshape(theta.shape[0], -1, per)
    unit = np.maximum(t.max(-1), 0.0) / hi
    if lo < 0:
        unit = np.maximum(unit, np.minimum(t.min(-1), 0.0) / lo)
    unit = round_to_dtype(unit.astype(np.float32), dtype).astype(np.float64)
    return np.where(np.isfinite(unit), unit, 0.0)


def _round_with_feedback(theta: torch.Tensor, M: torch.Tensor, step: torch.Tensor,
                         lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """GPTQ's rounding of ``theta [R, P]`` onto ``step * int`` (ints clamped to ``[lo, hi]``,
    ``[R, P]`` each) for the objective ``(x - theta)^T M (x - theta)``; returns the ints
    (float64 ``[R, P]``)."""
    P = theta.shape[1]
    diag = torch.diagonal(M, dim1=1, dim2=2)
    damp = 1e-8 * diag.mean(-1, keepdim=True) + 1e-30
    Minv = torch.cholesky_inverse(torch.linalg.cholesky(M + torch.diag_embed(
        damp.expand_as(diag))))
    U = torch.linalg.cholesky(Minv, upper=True)
    x = theta.clone()
    ints = torch.zeros_like(theta)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    for j in range(P):
        q = torch.clamp(torch.round(x[:, j] / safe[:, j]), lo[:, j], hi[:, j])
        q = torch.where(step[:, j] > 0, q, torch.zeros_like(q))
        ints[:, j] = q
        err = (x[:, j] - q * step[:, j]) / U[:, j, j]
        x[:, j + 1:] -= err[:, None] * U[:, j, j + 1:]
    return ints


def _fit_rows(W: torch.Tensor, H: torch.Tensor, coefs: list[torch.Tensor], L: int,
              theta0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta [R, P], M [R, P, P])``: the least-squares continuous sub-scales (and mins),
    ridge-pulled towards ``theta0``."""
    G = coefs[0].shape[1] // L
    M, v = _normal_equations(W, H, [(A, L, G) for A in coefs])
    diag = torch.diagonal(M, dim1=1, dim2=2)
    ridge = _RIDGE * diag.mean(-1, keepdim=True) + 1e-30
    Mr = M + torch.diag_embed(ridge.expand_as(diag))
    theta = torch.linalg.solve(Mr, (v + ridge * theta0).unsqueeze(-1)).squeeze(-1)
    return theta, Mr


def _candidate(W: np.ndarray, H: np.ndarray, codes: np.ndarray, grid: SuperBlockGrid,
               spec: GridSpec) -> SuperBlockGrid:
    """Steps 1-3 for every row: a grid with new ``d``/``sc`` (``dmin``/``m``)."""
    R, K = codes.shape
    L, per = spec.group_size, spec.super_size // spec.group_size
    G = K // L
    t = _table(spec, codes)
    mins = grid.dmin is not None
    coefs = [t] + ([-np.ones_like(t)] if mins else [])
    d_rep = np.repeat(grid.d.astype(np.float64), per, axis=1)
    th0 = [d_rep * grid.sc]
    if mins:
        th0.append(np.repeat(grid.dmin.astype(np.float64), per, axis=1) * grid.m)
    P = G * len(coefs)
    chunk = max(1, min(R, _MEM // (8 * P * P)))
    Hd = torch.from_numpy(H.astype(np.float64))
    rngs = [spec.sub_scale_range] + ([spec.sub_min_range] if mins else [])
    out_units = [np.zeros((R, K // spec.super_size)) for _ in coefs]
    out_ints = [np.zeros((R, G), dtype=np.int16) for _ in coefs]
    for r0 in range(0, R, chunk):
        rows = slice(r0, min(R, r0 + chunk))
        theta, M = _fit_rows(torch.from_numpy(W[rows].astype(np.float64)), Hd,
                             [torch.from_numpy(c[rows]) for c in coefs], L,
                             torch.from_numpy(np.concatenate([x[rows] for x in th0], axis=1)))
        th = theta.numpy()
        steps, los, his = [], [], []
        for f, (lo, hi) in enumerate(rngs):
            unit = _super_unit(th[:, f * G:(f + 1) * G], per, (lo, hi), spec.scale_dtype)
            out_units[f][rows] = unit
            steps.append(np.repeat(unit, per, axis=1))
            los.append(np.full_like(steps[-1], lo))
            his.append(np.full_like(steps[-1], hi))
        ints = _round_with_feedback(theta, M, *(torch.from_numpy(np.concatenate(a, axis=1))
                                                for a in (steps, los, his))).numpy()
        for f in range(len(coefs)):
            out_ints[f][rows] = ints[:, f * G:(f + 1) * G].astype(np.int16)
    f32 = [u.astype(np.float32) for u in out_units]
    if mins:
        return SuperBlockGrid(d=f32[0], sc=out_ints[0], dmin=f32[1], m=out_ints[1])
    return SuperBlockGrid(d=f32[0], sc=out_ints[0])


def _pick_rows(better: np.ndarray, new: SuperBlockGrid, old: SuperBlockGrid) -> SuperBlockGrid:
    arrs = {k: np.where(better[:, None], v, old.arrays()[k]).astype(v.dtype)
            for k, v in new.arrays().items()}
    return SuperBlockGrid(**arrs)


def refit_subscales(W: np.ndarray, H: np.ndarray, codes: np.ndarray, grid: Grid,
                    spec: GridSpec, *, name: str = "tensor") -> tuple[Grid, dict[str, Any]]:
    """Like :func:`refit_scales`, re-choosing a super-block grid's integer ``sc`` / ``m`` too.

    Args:
        W: float32 ``[out, in]`` original weight; H: float32 ``[in, in]`` undamped Hessian.
        codes: uint8 ``[out, in]``; grid: satisfies ``spec`` for ``codes``.
    Returns:
        ``(grid, stats)`` as :func:`refit_scales`; per row the best of the input, the
        ``d``/``dmin``-only re-fit and this one (``refit_sub_rows``: the fraction of rows that
        took new integers).
    """
    if not isinstance(grid, SuperBlockGrid):
        return refit_scales(W, H, codes, grid, spec, name=name)
    plain, before, after_plain = refit_rows(W, H, codes, grid, spec, name=name)
    cand = _candidate(W, H, codes, grid, spec)
    cand, _, after_cand = refit_rows(W, H, codes, cand, spec, name=name)   # step 4
    objs = np.stack([np.where(np.isfinite(o), o, np.inf)
                     for o in (before, after_plain, after_cand)])
    pick = np.argmin(objs, axis=0)                                 # ties: the earlier grid
    out = _pick_rows(pick == 1, plain, grid)
    out = _pick_rows(pick == 2, cand, out)
    total0 = float(objs[0].sum())
    total1 = float(objs.min(0).sum())
    return out, {"refit_rows": round(float((pick > 0).mean()), 4),
                 "refit_sub_rows": round(float((pick == 2).mean()), 4),
                 "refit_gain": round(total1 / total0, 6) if total0 > 0 else 1.0,
                 "before": total0, "after": total1}
