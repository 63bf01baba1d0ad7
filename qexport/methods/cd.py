"""Coordinate descent over the codes on a fixed grid (``--cd P``; QuantEase-style).

GPTQ rounds each column once, in one order, and never revisits it. With the grid fixed, the
layer objective ``f = tr(E H E^T)`` (``E = W - Q``) is a convex quadratic in each decoded
value ``Q[i, j]`` alone, so the best code for one weight, the others held, is the grid value
nearest to ``Q[i, j] + G[i, j] / H[j, j]`` with ``G = E H``. A pass visits every column once
(all rows at once) and can only lower ``f``; after a change ``G`` is updated by
``dE[:, j] H[j, :]``, lazily in blocks of columns as GPTQ does.

| quantity | shape (dtype)           | meaning                                              |
|----------|-------------------------|------------------------------------------------------|
| ``W``    | ``[out, in]`` float32   | the original weight                                  |
| ``H``    | ``[in, in]`` float32    | the layer's Hessian, damped by ``percdamp`` (ridge)   |
| codes    | ``[out, in]`` uint8     | the method's codes; the grid is never changed         |

Dead columns (``H[j, j] = 0``) keep their codes. Written by hand: QuantEase (Behdin et al.,
2023) publishes the update, no library applies it to GGUF / k-quant grids.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qexport.grids import AffineGrid, Grid, GridSpec, ZeroDomain
from qexport.grids.fit import _levels
from qexport.grids.grid import _table_value

__all__ = ["cd_codes"]

#: columns per lazy block
_BLOCK = 128


def _column_levels(spec: GridSpec, grid: Grid, K: int, c0: int, c1: int) -> torch.Tensor:
    """float64 ``[rows, c1 - c0, 2**bits]``: every value the codes of columns c0..c1 decode to."""
    gl = spec.group_size if spec.group_size > 0 else K
    gidx = np.arange(c0, c1) // gl
    return torch.from_numpy(_levels_any(spec, grid, gidx).astype(np.float64))


def _levels_any(spec: GridSpec, grid: Grid, gidx: np.ndarray) -> np.ndarray:
    """``_levels`` for every grid kind (affine grids decoded code by code)."""
    if not isinstance(grid, AffineGrid):
        return _levels(spec, grid, gidx)
    codes = np.arange(spec.maxq + 1, dtype=np.float32)
    s = grid.scales[:, gidx, None]
    if spec.zero == ZeroDomain.NONE:
        return s * _table_value(spec, codes.astype(np.uint8))
    if spec.zero == ZeroDomain.INT:
        return s * (codes - grid.zeros[:, gidx, None].astype(np.float32))
    return s * codes + grid.mins[:, gidx, None]


def cd_codes(W: np.ndarray, H: np.ndarray, codes: np.ndarray, grid: Grid, spec: GridSpec,
             passes: int, *, percdamp: float = 0.0) -> tuple[np.ndarray, dict[str, Any]]:
    """``passes`` coordinate-descent sweeps over ``codes`` on the fixed ``grid``.

    Args:
        W: float32 ``[out, in]``; H: float32 ``[in, in]`` undamped Hessian; codes: uint8
            ``[out, in]`` satisfying ``spec`` with ``grid``; percdamp: ridge added to ``H`` as a
            fraction of its mean diagonal (the method's damp keeps codes near ``W``).
    Returns:
        ``(codes, stats)``: new uint8 codes; stats ``cd_changed`` (fraction of codes changed)
        and ``cd_gain`` (damped objective after / before).
    """
    K = W.shape[1]
    Hd = torch.from_numpy(H.astype(np.float64))
    diag = torch.diagonal(Hd)
    Hd = Hd + torch.eye(K, dtype=torch.float64) * percdamp * diag.mean()
    dead = np.diag(H) == 0
    c = torch.from_numpy(codes.astype(np.int64))
    Q = torch.cat([torch.gather(_column_levels(spec, grid, K, c0, min(K, c0 + _BLOCK)), 2,
                                c[:, c0:c0 + _BLOCK, None])[..., 0]
                   for c0 in range(0, K, _BLOCK)], dim=1)
    E = torch.from_numpy(W.astype(np.float64)) - Q
    G = E @ Hd
    f0 = float(torch.einsum("ij,ij->", G, E))
    for p in range(passes):
        if p:
            G = E @ Hd                              # afresh each pass: no drift of the updates
        for c0 in range(0, K, _BLOCK):
            c1 = min(K, c0 + _BLOCK)
            lv = _column_levels(spec, grid, K, c0, c1)                  # [rows, c1-c0, levels]
            dE = torch.zeros(E.shape[0], c1 - c0, dtype=torch.float64)
            for j in range(c0, c1):
                if dead[j]:
                    continue
                L = lv[:, j - c0]                                       # [rows, levels]
                target = Q[:, j] + G[:, j] / Hd[j, j]
                k = torch.argmin((L - target[:, None]).abs(), dim=1)
                newq = torch.gather(L, 1, k[:, None])[:, 0]
                d = Q[:, j] - newq                                       # change of E[:, j]
                c[:, j], Q[:, j] = k, newq
                E[:, j] += d
                dE[:, j - c0] = d
                G[:, c0:c1] += d[:, None] * Hd[j, c0:c1][None, :]
            if c1 < K:
                G[:, c1:] += dE @ Hd[c0:c1, c1:]
    f1 = float(torch.einsum("ij,ij->", E @ Hd, E))
    new = c.numpy().astype(np.uint8)
    return new, {"cd_changed": round(float((new != codes).mean()), 5),
                 "cd_gain": round(f1 / f0, 6) if f0 > 0 else 1.0}
