"""Batched weighted 1-D k-means: one independent clustering per row, all rows at once.

LeanQuant's non-uniform grid is ``sklearn.cluster.KMeans(n_clusters, init, max_iter=100,
tol=1e-6).fit(row[:, None], sample_weight=s)`` for every output row. This module computes the
same thing for a whole ``[rows, n]`` batch in torch float64, using that the data are 1-D:

| step        | sklearn (Lloyd, dense)                     | here (per row, vectorised)        |
|-------------|--------------------------------------------|-----------------------------------|
| E-step      | label = nearest center                     | sort the row once; clusters are   |
|             |                                            | runs between center midpoints     |
|             |                                            | (``searchsorted``)                |
| M-step      | weighted mean per cluster                  | prefix sums of ``w`` and ``w x``  |
| empty       | move to the points farthest from their     | same, farthest first (points of   |
| cluster     | centers (``argpartition`` order); if none  | weight 0 are never chosen); then  |
|             | is left, copy the heaviest cluster's center| the heaviest cluster's center     |
| stop        | labels unchanged, or ``sum(shift^2) <=     | same, per row (``tol`` scaled by  |
|             | tol * mean(var(X))``; at most max_iter     | the row's unweighted variance)    |

Centers are kept sorted ascending (in 1-D, Lloyd steps preserve their order). ``init``:
``"uniform"`` (linspace from the row min to max, LeanQuant's choice for <= 3 bits),
``"kmeans++"`` (sklearn's greedy weighted k-means++ with ``2 + floor(ln k)`` local trials,
seeded; LeanQuant's choice at 4+ bits; the random stream differs from sklearn's) or an explicit
``[rows, k]`` array. :func:`optimal_kmeans_1d` is the exact weighted optimum by dynamic
programming (LeanQuant issue #1), O(k n^2) per row (slow: an experiment option).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from qexport.errors import InputError

__all__ = ["weighted_kmeans_1d", "kmeanspp_init", "uniform_init", "optimal_kmeans_1d",
           "INITS"]

INITS = ("uniform", "kmeans++")


def _as_batch(x: np.ndarray, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if xt.ndim != 2 or xt.shape[1] == 0:
        raise InputError(f"k-means data expected a 2-D [rows, n] array (not {list(xt.shape)})")
    wt = torch.as_tensor(np.asarray(w, dtype=np.float64))
    wt = wt.expand_as(xt) if wt.ndim == 1 else wt
    if tuple(wt.shape) != tuple(xt.shape) or bool((wt < 0).any()):
        raise InputError(f"k-means weights expected non-negative [n] or [rows, n] "
                         f"(not {list(wt.shape)} for data {list(xt.shape)})")
    return xt, wt


def uniform_init(xs: torch.Tensor, k: int) -> torch.Tensor:
    """``linspace(min, max, k)`` per row of the sorted data ``xs [rows, n]``."""
    t = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    lo, hi = xs[:, :1], xs[:, -1:]
    return lo + (hi - lo) * t


def kmeanspp_init(xs: torch.Tensor, ws: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Greedy weighted k-means++ (sklearn's algorithm) on sorted rows; float64 ``[rows, k]``.

    Distances are computed in float32 (an initialisation only needs to be good, not exact).
    """
    gen = torch.Generator().manual_seed(int(seed))
    rows, n = xs.shape
    ws = torch.where(ws.sum(1, keepdim=True) > 0, ws, torch.ones_like(ws))
    x32, w32 = xs.float(), ws.float()
    trials = 2 + int(math.log(k))
    idx = _sample(torch.cumsum(ws, 1), torch.rand(rows, 1, generator=gen, dtype=torch.float64))
    centers = [xs.gather(1, idx)]
    closest = (x32 - x32.gather(1, idx)) ** 2
    for _ in range(1, k):
        cum = torch.cumsum((w32 * closest).double(), 1)
        cand = _sample(cum, torch.rand(rows, trials, generator=gen, dtype=torch.float64))
        dist = x32[:, None, :] - x32.gather(1, cand)[:, :, None]      # [rows, trials, n]
        dist.square_()
        torch.minimum(dist, closest[:, None, :], out=dist)
        best = torch.argmin(torch.bmm(dist, w32[:, :, None])[..., 0], dim=1)
        closest = dist[torch.arange(rows), best]
        centers.append(xs.gather(1, cand.gather(1, best[:, None])))
    return torch.sort(torch.cat(centers, 1), dim=1).values


def _sample(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices drawn with probability proportional to the increments of ``cum``."""
    idx = torch.searchsorted(cum, (u * cum[:, -1:]).contiguous())
    return idx.clamp_(max=cum.shape[1] - 1)


def _prefix(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(v[:, :1]), torch.cumsum(v, 1)], 1)


def _partition(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cluster bounds ``[rows, k+1]`` of sorted rows for sorted centers ``c`` (ties go to the
    lower center, as sklearn's argmin does)."""
    mids = ((c[:, :-1] + c[:, 1:]) / 2).contiguous()
    inner = torch.searchsorted(xs, mids, right=True)
    rows, n = xs.shape
    return torch.cat([inner.new_zeros(rows, 1), inner, inner.new_full((rows, 1), n)], 1)


def _relocate(xs, ws, c, bounds, Wk, Sk, rows_idx) -> None:
    """sklearn's empty-cluster relocation for the rows ``rows_idx`` (in place on Wk, Sk)."""
    xs, ws, c, b = xs[rows_idx], ws[rows_idx], c[rows_idx], bounds[rows_idx]
    W, S = Wk[rows_idx], Sk[rows_idx]
    empty = W <= 0
    n = xs.shape[1]
    lab = torch.searchsorted(b[:, 1:-1].contiguous(),
                             torch.arange(n).expand(xs.shape[0], n).contiguous(), right=True)
    dist = torch.where(ws > 0, (xs - c.gather(1, lab)) ** 2, torch.full_like(xs, -1.0))
    m = int(empty.sum(1).max())
    far = torch.topk(dist, min(m, n), dim=1).indices                      # farthest first
    rank = (torch.cumsum(empty.long(), 1) - 1).clamp_(0, far.shape[1] - 1)
    pick = far.gather(1, rank)                                            # [r, k]
    ok = empty & (dist.gather(1, pick) > 0) & (dist.amax(1, keepdim=True) > 0)
    wf, xf = ws.gather(1, pick) * ok, xs.gather(1, pick)
    W.scatter_add_(1, lab.gather(1, pick), -wf)
    S.scatter_add_(1, lab.gather(1, pick), -wf * xf)
    Wk[rows_idx] = torch.where(ok, wf, W)
    Sk[rows_idx] = torch.where(ok, wf * xf, S)


def weighted_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int, *,
                       init: str | np.ndarray = "uniform", max_iter: int = 100,
                       tol: float = 1e-6, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Weighted Lloyd k-means of every row of ``x`` (sklearn semantics, see the module table).

    Args:
        x: float ``[rows, n]`` data, one clustering per row.
        w: float ``[n]`` (shared) or ``[rows, n]`` non-negative sample weights.
        k: clusters per row.
        init: "uniform", "kmeans++" or float ``[rows, k]`` initial centers.
        max_iter, tol: as sklearn (``tol`` relative to the row's variance).
        seed: k-means++ seed.
    Returns:
        float64 ``[rows, k]`` centers sorted ascending, and ``{"iters_mean", "iters_max"}``.
    """
    xt, wt = _as_batch(x, w)
    rows, n = xt.shape
    mean = xt.mean(1, keepdim=True)                       # sklearn centers X the same way
    xs, order = torch.sort(xt - mean, dim=1)
    ws = wt.gather(1, order)
    if isinstance(init, str):
        if init not in INITS:
            raise InputError(f"k-means init expected one of {INITS} or an array (not {init!r})")
        c = uniform_init(xs, k) if init == "uniform" else kmeanspp_init(xs, ws, k, seed)
    else:
        c = torch.as_tensor(np.asarray(init, dtype=np.float64)).reshape(rows, k) - mean
        c = torch.sort(c, dim=1).values
    tol_abs = xt.var(1, unbiased=False) * tol
    cw, cwx = _prefix(ws), _prefix(ws * xs)
    prev = torch.full((rows, k + 1), -1, dtype=torch.long)
    active = torch.ones(rows, dtype=torch.bool)
    iters = torch.zeros(rows, dtype=torch.long)
    for _ in range(max_iter):
        b = _partition(xs, c)
        Wk = cw.gather(1, b[:, 1:]) - cw.gather(1, b[:, :-1])
        Sk = cwx.gather(1, b[:, 1:]) - cwx.gather(1, b[:, :-1])
        need = torch.nonzero(active & (Wk <= 0).any(1)).flatten()
        if need.numel():
            _relocate(xs, ws, c, b, Wk, Sk, need)
        c_new = torch.where(Wk > 0, Sk / torch.where(Wk > 0, Wk, 1.0), 0.0)
        heavy = c_new.gather(1, torch.argmax(Wk, dim=1, keepdim=True))
        c_new = torch.where(Wk > 0, c_new, heavy)          # still empty: the heaviest center
        shift = ((c_new - c) ** 2).sum(1)
        done = (b == prev).all(1) | (shift <= tol_abs)
        c = torch.where(active[:, None], torch.sort(c_new, dim=1).values, c)
        iters += active.long()
        prev = b
        active &= ~done
        if not bool(active.any()):
            break
    info = {"iters_mean": float(iters.double().mean()), "iters_max": int(iters.max())}
    return (c + mean).numpy(), info


def optimal_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int,
                      max_elements: int = 1 << 22) -> np.ndarray:
    """Exact weighted 1-D k-means per row (dynamic programming over the sorted row).

    ``D[m][j] = min_i D[m-1][i] + cost(i, j)`` with ``cost`` the weighted squared deviation
    of sorted points ``i..j-1`` from their weighted mean (prefix sums), float64, as many rows
    at a time as fit ``max_elements`` entries of an ``[rows, n+1, n+1]`` table. O(k n^2) per
    row: slow (about 40-55 s of one core for 1536 rows x 576 at 3-4 bits), an experiment
    option. Returns float64 ``[rows, k]`` sorted centers (needs ``n >= k``).
    """
    xt, wt = _as_batch(x, w)
    rows, n = xt.shape
    if n < k:
        raise InputError(f"optimal k-means needs at least k={k} points per row (not {n})")
    chunk = max(1, max_elements // ((n + 1) ** 2))
    mean = xt.mean(1, keepdim=True)
    xs, order = torch.sort(xt - mean, dim=1)
    ws = wt.gather(1, order)
    ws = torch.where(ws.sum(1, keepdim=True) > 0, ws, torch.ones_like(ws))
    out = torch.empty(rows, k, dtype=torch.float64)
    for r0 in range(0, rows, chunk):
        out[r0:r0 + chunk] = _dp_rows(xs[r0:r0 + chunk], ws[r0:r0 + chunk], k)
    return (torch.sort(out, dim=1).values + mean).numpy()


def _dp_rows(xs: torch.Tensor, ws: torch.Tensor, k: int) -> torch.Tensor:
    rows, n = xs.shape
    cw, cwx, cwxx = _prefix(ws), _prefix(ws * xs), _prefix(ws * xs * xs)
    i = torch.arange(n + 1)
    lo, hi = i[:, None], i[None, :]                       # segment [lo, hi)
    sw = cw[:, None, :] - cw[:, :, None]                  # [rows, lo, hi]
    sx = cwx[:, None, :] - cwx[:, :, None]
    cost = (cwxx[:, None, :] - cwxx[:, :, None]) - sx * sx / torch.where(sw > 0, sw, 1.0)
    cost = torch.where(hi > lo, cost.clamp_min(0), torch.inf)
    D = cost[:, 0, :]                                     # one cluster: [rows, hi]
    arg = []
    for _ in range(1, k):
        tot = D[:, :, None] + cost                        # [rows, split, hi]
        D, a = tot.min(1)
        arg.append(a)
    centers = torch.empty(rows, k, dtype=torch.float64)
    end = torch.full((rows,), n, dtype=torch.long)
    r = torch.arange(rows)
    for m in range(k - 1, -1, -1):
        start = arg[m - 1][r, end] if m > 0 else torch.zeros_like(end)
        s_w = cw[r, end] - cw[r, start]
        s_x = cwx[r, end] - cwx[r, start]
        fill = xs[r, (end - 1).clamp(min=0)]
        centers[:, m] = torch.where(s_w > 0, s_x / torch.where(s_w > 0, s_w, 1.0), fill)
        end = start
    return centers
