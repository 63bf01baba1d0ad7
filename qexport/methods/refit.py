"""Scale re-fit: the Hessian least-squares grid parameters for fixed codes (``--refit N``).

Once a method has chosen the codes, every decoded weight is *linear* in the grid's float
parameters (the integer parts — codes, zero points, k-quant sub-scales and sub-mins — held
fixed):

| grid                  | decode                          | re-fitted floats (per row)      |
|-----------------------|---------------------------------|---------------------------------|
| affine/none, table    | ``s * T(code)``                 | ``scales``  (one per group)     |
| affine/int            | ``s * (code - z)``              | ``scales``                      |
| affine/float          | ``s * code + min``              | ``scales``, ``mins``            |
| superblock            | ``(d * sc) * T(code) - dmin*m`` | ``d``, ``dmin`` (per superblock)|

So the layer objective ``tr((W - Q) H (W - Q)^T)`` is an exact quadratic in them, row by row:
``theta = (B^T H B)^-1 B^T H w``. That is the closed-form counterpart of TesseraQ's dequant
scale tuning, on the layer's Hessian. The solution is rounded to the spec's scale dtype, and a
row keeps it only where its objective falls, so a re-fit never makes a row worse. With
``rounds > 1`` GPTQ's loop re-runs on the re-fitted grid (new codes for the new scales) and
re-fits again; the best result by objective is kept.

Written by hand: no library solves this for k-quant super-blocks. Free codebooks (LeanQuant-nu)
are refused: their values are already fitted by weighted k-means.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qexport.errors import UnsupportedError
from qexport.grids import AffineGrid, Grid, GridKind, GridSpec, SuperBlockGrid, ZeroDomain, \
    dequantize
from qexport.grids.grid import grid_from_arrays
from qexport.grids.spec import round_to_dtype

__all__ = ["refit_scales", "refit_rows", "refit_rounds", "check_refit_spec"]

#: rows per chunk of the ``[rows, in, params]`` products
_CHUNK = 64
#: ridge, relative to the mean diagonal of a row's normal matrix, pulling towards the old value
_RIDGE = 1e-6


def check_refit_spec(spec: GridSpec, name: str) -> None:
    """Raise UnsupportedError (naming ``name``) for grids whose values are not re-fitted."""
    if spec.kind == GridKind.CODEBOOK and spec.free_codebook:
        raise UnsupportedError(f"{name}: --refit re-fits affine, super-block and fixed-table "
                               f"grids (not the free codebook {spec.name}; its values are "
                               "already k-means fitted)")


def _table(spec: GridSpec, codes: np.ndarray) -> np.ndarray:
    if spec.table is not None:
        return np.asarray(spec.table, dtype=np.float64)[codes]
    return codes.astype(np.float64) - spec.code_offset


def _families(codes: np.ndarray, grid: Grid, spec: GridSpec
              ) -> list[tuple[str, np.ndarray, int]]:
    """``(array name, coefficient float64 [out, in], columns per parameter)`` for every float
    parameter array the decode is linear in."""
    in_f = codes.shape[1]
    L = spec.group_len(in_f)
    t = _table(spec, codes)
    if isinstance(grid, AffineGrid):
        if spec.zero == ZeroDomain.NONE:
            return [("scales", t, L)]
        if spec.zero == ZeroDomain.INT:
            z = np.repeat(grid.zeros.astype(np.float64), L, axis=1)[:, :in_f]
            return [("scales", codes.astype(np.float64) - z, L)]
        return [("scales", codes.astype(np.float64), L), ("mins", np.ones_like(t), L)]
    if isinstance(grid, SuperBlockGrid):
        sc = np.repeat(grid.sc.astype(np.float64), L, axis=1)
        fam = [("d", sc * t, spec.super_size)]
        if grid.dmin is not None:
            fam.append(("dmin", -np.repeat(grid.m.astype(np.float64), L, axis=1),
                        spec.super_size))
        return fam
    return [("scales", t, L)]


def _pad(x: torch.Tensor, n: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad ``x`` to length ``n`` along ``dims`` (ragged last group)."""
    for d in dims:
        if x.shape[d] < n:
            shape = list(x.shape)
            shape[d] = n - x.shape[d]
            x = torch.cat([x, x.new_zeros(shape)], dim=d)
    return x


def _normal_equations(W: torch.Tensor, H: torch.Tensor,
                      fam: list[tuple[torch.Tensor, int, int]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``M [out, P, P] = B^T H B`` and ``v [out, P] = B^T H w`` per row (float64), where the
    parameters of family ``f`` (coefficients ``A_f [out, in]``, ``L_f`` columns each, ``P_f``
    of them) are laid out one family after the other."""
    R, K = W.shape
    sizes = [P for _, _, P in fam]
    offs = np.cumsum([0] + sizes)
    M = torch.zeros(R, offs[-1], offs[-1], dtype=torch.float64)
    v = torch.zeros(R, offs[-1], dtype=torch.float64)
    HW = W @ H
    for g, (Ag, Lg, Pg) in enumerate(fam):
        n = Pg * Lg
        Hg = _pad(H, n, (1,)).reshape(K, Pg, Lg)
        v[:, offs[g]:offs[g + 1]] = _pad(Ag * HW, n, (1,)).reshape(R, Pg, Lg).sum(-1)
        for r0 in range(0, R, _CHUNK):
            Ac = _pad(Ag[r0:r0 + _CHUNK], n, (1,)).reshape(-1, Pg, Lg)
            Z = torch.einsum("iql,rql->riq", Hg, Ac)              # [rows, in, Pg]
            for f, (Af, Lf, Pf) in enumerate(fam):
                m = Pf * Lf
                Zf = _pad(Z, m, (1,)).reshape(-1, Pf, Lf, Pg)
                Afc = _pad(Af[r0:r0 + _CHUNK], m, (1,)).reshape(-1, Pf, Lf)
                M[r0:r0 + _CHUNK, offs[f]:offs[f + 1], offs[g]:offs[g + 1]] = \
                    torch.einsum("rpl,rplq->rpq", Afc, Zf)
    return M, v


def _row_objective(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> np.ndarray:
    """float64 ``[out]``: ``(w - q)^T H (w - q)`` per row."""
    E = W.astype(np.float64) - Q.astype(np.float64)
    with np.errstate(all="ignore"):
        return np.einsum("ij,ij->i", E @ H.astype(np.float64), E)


def refit_scales(W: np.ndarray, H: np.ndarray, codes: np.ndarray, grid: Grid, spec: GridSpec,
                 *, name: str = "tensor") -> tuple[Grid, dict[str, Any]]:
    """The grid whose float parameters minimise the layer objective for ``codes``.

    Args:
        W: float32 ``[out, in]`` original weight; H: float32 ``[in, in]`` undamped Hessian.
        codes: uint8 ``[out, in]``; grid: satisfies ``spec`` for ``codes``.
    Returns:
        ``(grid, stats)``: a grid of the same kind and integer fields, its floats
        representable in ``spec.scale_dtype``; stats ``refit_rows`` (fraction of rows changed),
        ``refit_gain`` (objective after / before) and the float64 objectives ``before`` and
        ``after``.
    """
    out, before, after = refit_rows(W, H, codes, grid, spec, name=name)
    total0, total1 = float(before.sum()), float(after.sum())
    return out, {"refit_rows": round(float((after < before).mean()), 4),
                 "refit_gain": round(total1 / total0, 6) if total0 > 0 else 1.0,
                 "before": total0, "after": total1}


def refit_rows(W: np.ndarray, H: np.ndarray, codes: np.ndarray, grid: Grid, spec: GridSpec,
               *, name: str = "tensor") -> tuple[Grid, np.ndarray, np.ndarray]:
    """:func:`refit_scales`' grid with the float64 ``[out]`` row objectives of ``grid``
    (before) and of the returned grid (after, ``<=`` before)."""
    check_refit_spec(spec, name)
    names_coefs = _families(codes, grid, spec)
    old = grid.arrays()
    fam = [(torch.from_numpy(A), L, old[nm].shape[1]) for nm, A, L in names_coefs]
    Wd, Hd = torch.from_numpy(W.astype(np.float64)), torch.from_numpy(H.astype(np.float64))
    M, v = _normal_equations(Wd, Hd, fam)
    th0 = torch.from_numpy(np.concatenate([old[nm] for nm, _, _ in names_coefs], axis=1)
                           .astype(np.float64))
    diag = torch.diagonal(M, dim1=1, dim2=2)
    ridge = _RIDGE * diag.mean(-1, keepdim=True) + 1e-30
    th = torch.linalg.solve(M + torch.diag_embed(ridge.expand_as(diag)),
                            (v + ridge * th0).unsqueeze(-1)).squeeze(-1).numpy()
    new, col = dict(old), 0
    for nm, _, _ in names_coefs:
        n = old[nm].shape[1]
        with np.errstate(over="ignore", invalid="ignore"):
            new[nm] = round_to_dtype(th[:, col:col + n].astype(np.float32), spec.scale_dtype)
        col += n
    cand = grid_from_arrays(grid.kind, new, name)
    before = _row_objective(W, dequantize(codes, grid, spec), H)
    with np.errstate(all="ignore"):
        after = _row_objective(W, dequantize(codes, cand, spec), H)
    better = np.isfinite(after) & (after < before)
    for nm, _, _ in names_coefs:
        new[nm] = np.where(better[:, None], new[nm], old[nm]).astype(np.float32)
    return grid_from_arrays(grid.kind, new, name), before, np.where(better, after, before)


def refit_rounds(W: np.ndarray, H: np.ndarray, codes: np.ndarray, grid: Grid, spec: GridSpec,
                 rounds: int, *, name: str = "tensor", percdamp: float = 0.01,
                 blocksize: int = 128, actorder: bool = True, sub: bool = False,
                 cd: int = 0, cd_damp: float = 0.0) -> tuple[np.ndarray, Grid, dict[str, Any]]:
    """``rounds`` re-fits; between two, GPTQ's loop re-chooses the codes on the new grid.
    ``sub``: super-block grids re-choose their integer sub-scales / sub-mins too
    (:func:`qexport.methods.refit_sub.refit_subscales`). ``cd``: before each re-fit, that
    many coordinate-descent passes over the codes on the current grid
    (:func:`qexport.methods.cd.cd_codes`, ridge ``cd_damp``).

    Returns:
        ``(codes, grid, stats)`` with the lowest objective seen (the input's included);
        stats: ``refit`` (rounds), ``refit_objective0`` / ``objective`` (before / after),
        ``refit_best_round`` (0: the input was best) and that round's ``refit_rows`` (and,
        with ``sub``, ``refit_sub_rows``: the fractions of rows that took new floats /
        integers; with ``cd``, ``cd_changed``: the fraction of codes coordinate descent moved).
    """
    from qexport.methods.cd import cd_codes
    from qexport.methods.gptq import gptq_on_grid
    from qexport.methods.refit_sub import refit_subscales
    fit = refit_subscales if sub else refit_scales
    if rounds < 1:
        raise UnsupportedError(f"{name}: refit rounds expected >= 1 (not {rounds})")
    obj0 = float(_row_objective(W, dequantize(codes, grid, spec), H).sum())
    best: tuple[float, np.ndarray, Grid, int] = (obj0, codes, grid, 0)
    rows: dict[str, float] = {}
    stats: dict[str, Any] = {"refit": rounds, **({"refit_sub": True} if sub else {}),
                             **({"cd": cd} if cd else {}), "refit_objective0": obj0}
    for r in range(1, rounds + 1):
        if r > 1:
            codes, _, _ = gptq_on_grid(W, H, spec, grid, name=name, blocksize=blocksize,
                                       percdamp=percdamp, actorder=actorder)
        cst: dict[str, Any] = {}
        if cd:
            codes, cst = cd_codes(W, H, codes, grid, spec, cd, percdamp=cd_damp)
        grid, st = fit(W, H, codes, grid, spec, name=name)
        if st["after"] < best[0]:
            best = (st["after"], codes, grid, r)
            rows = {k: v for k, v in {**st, **cst}.items()
                    if k in ("refit_rows", "refit_sub_rows", "cd_changed")}
    stats.update({"objective": best[0], "refit_best_round": best[3], **rows})
    return best[1], best[2], stats
