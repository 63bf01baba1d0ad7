"""LeanQuant (Zhang & Shrivastava, ICLR 2025): loss-error-aware grids inside the GPTQ loop.

Both variants are GPTQ (:func:`qexport.methods.gptq.gptq_quantize`, unchanged column loop) with
its span fitter replaced; the fitter receives the per-column loss weights ``s_j = U_jj^-p``
(``U`` the upper Cholesky factor of the damped ``H^-1`` in loop order; ``p`` in the reference
code's units, so the exact GPTQ loss weighting is ``p = 2``; clamped to ``[0, 1e30]``; dead
columns 0). See algorithms.md section 2.

| variant | spec kinds            | grid, and when it is fitted                              |
|---------|-----------------------|----------------------------------------------------------|
| nu      | free codebook: 2**bits| once, before the loop (static), on the dead-masked       |
|         | fp16 values per row   | original W: weighted k-means per row (or row-group),     |
|         | (or row and group)    | Lloyd with sklearn's semantics (:mod:`kmeans`), init     |
|         |                       | linspace(min, max) at <= 3 bits and seeded k-means++ at  |
|         |                       | 4+ (the reference's choice), max_iter 100, tol 1e-6; or  |
|         |                       | the exact 1-D optimum (``optimal=True``); values rounded |
|         |                       | to fp16 and sorted before the loop, so codes are exact   |
| aff     | affine (none / int /  | the weighted-error search of :mod:`grid_search` /        |
|         | float), superblock    | :mod:`superblock_search` (candidate grids + weighted     |
|         | (k-quants, IQ4_XS),   | least squares, min-max always a candidate); GPTQ's rule: |
|         | fixed table (IQ4_NL)  | dynamic spans at their first column on the updated W,    |
|         |                       | static / per-channel / act-order spans up front          |

Defaults: nu follows the reference README (``p = 4``, ``percdamp = 0.1``, act-order on). aff
(no released reference) uses ``p = 2``, the exact GPTQ loss weighting: on SmolLM2-135M layers
(c4 calibration, 32 x 512 tokens) ``p = 2`` gave the lowest layer objective on every spec
tried (x min-max GPTQ: W4 g128 sym 0.45-0.87, W3 g128 asym 0.42-0.74, IQ4_NL 0.38-0.78, Q3_K
0.84-0.91, Q6_K 0.67-0.76), while ``p = 4`` was sometimes worse than GPTQ for symmetric 4-bit
(up to 1.46 x): it fits a few columns exactly and clips the rest.
Stats add ``method`` (``leanquant_nu`` / ``leanquant_aff``), ``p`` and the search settings; the
objective ``tr((W-Q) H (W-Q)^T)`` is GPTQ's.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import numpy as np
import torch

from qexport.errors import InputError, UnsupportedError
from qexport.grids import CodebookGrid, Grid, GridKind, GridSpec, concat_grids, round_to_dtype

from .gptq import gptq_quantize
from .grid_search import search_span
from .kmeans import INITS, optimal_kmeans_1d, weighted_kmeans_1d
from .result import QuantResult
from .superblock_search import search_superblock

__all__ = ["leanquant_nu_quantize", "leanquant_aff_quantize", "KMeansFitter", "SearchFitter"]


def _span_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """float64 ``[n]`` weights scaled to max 1; uniform when all zero (e.g. all dead)."""
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    top = float(w.max()) if w.size else 0.0
    return w / top if top > 0 else np.ones(n)


class KMeansFitter:
    """GPTQ span fitter of LeanQuant_nu: per-row weighted k-means -> fp16 value table.

    Args:
        init: "auto" (uniform at <= 3 bits, k-means++ above), "uniform" or "kmeans++".
        max_iter, tol, seed: Lloyd settings (sklearn's meaning).
        optimal: exact 1-D weighted k-means (dynamic programming) instead of Lloyd.
    """

    def __init__(self, init: str = "auto", max_iter: int = 100, tol: float = 1e-6,
                 seed: int = 0, optimal: bool = False) -> None:
        if init != "auto" and init not in INITS:
            raise InputError(f"k-means init expected 'auto' or one of {INITS} (not {init!r})")
        self.init, self.max_iter, self.tol = init, max_iter, tol
        self.seed, self.optimal = seed, optimal
        self.iters: list[float] = []
        self.seconds = 0.0

    def init_for(self, bits: int) -> str:
        return ("uniform" if bits <= 3 else "kmeans++") if self.init == "auto" else self.init

    def __call__(self, spec: GridSpec, W_span: np.ndarray, col0: int,
                 weights: np.ndarray | None) -> Grid:
        t0 = time.perf_counter()
        k = 2 ** spec.bits
        w = _span_weights(weights, W_span.shape[1])
        if self.optimal:
            c = optimal_kmeans_1d(W_span, w, k)
        else:
            c, info = weighted_kmeans_1d(W_span, w, k, init=self.init_for(spec.bits),
                                         max_iter=self.max_iter, tol=self.tol,
                                         seed=self.seed + col0)
            self.iters.append(info["iters_mean"])
        vals = np.sort(round_to_dtype(c.astype(np.float32), spec.scale_dtype), axis=1)
        self.seconds += time.perf_counter() - t0
        return CodebookGrid(values=np.ascontiguousarray(vals[:, None, :]))


class SearchFitter:
    """GPTQ span fitter of LeanQuant_aff: the weighted-error grid search of one span."""

    def __init__(self, grid: int = 10, refine: int = 2) -> None:
        if grid < 2 or refine < 0:
            raise InputError(f"grid search expected grid >= 2 and refine >= 0 (not {grid}, "
                             f"{refine})")
        self.grid, self.refine = grid, refine
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, spec: GridSpec, W_span: np.ndarray, col0: int,
                 weights: np.ndarray | None) -> Grid:
        t0 = time.perf_counter()
        W = np.ascontiguousarray(W_span, dtype=np.float32)
        if spec.kind == GridKind.SUPERBLOCK:
            parts = [search_superblock(spec, W[:, c:c + spec.super_size],
                                       None if weights is None else
                                       weights[c:c + spec.super_size],
                                       grid=self.grid, refine=self.refine)
                     for c in range(0, W.shape[1], spec.super_size)]
            g = parts[0] if len(parts) == 1 else concat_grids(parts)
        else:
            g = search_span(spec, W, weights, grid=self.grid, refine=self.refine)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return g


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Limit torch's intra-op threads inside the block (None: leave as is)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def leanquant_nu_quantize(W: np.ndarray | torch.Tensor, H: np.ndarray | torch.Tensor,
                          spec: GridSpec, *, name: str = "tensor", p: float = 4.0,
                          percdamp: float = 0.1, blocksize: int = 128, actorder: bool = True,
                          init: str = "auto", kmeans_iters: int = 100, tol: float = 1e-6,
                          seed: int = 0, optimal: bool = False, max_percdamp: float = 1.0,
                          threads: int | None = None) -> QuantResult:
    """LeanQuant_nu: GPTQ with per-row (or per-row-group) weighted k-means value tables.

    Args:
        W: float32 ``[out, in]``; H: float32 ``[in, in]`` (``2/N sum x x^T``); neither modified.
        spec: free-codebook GridSpec (``kind=codebook, free_codebook=True``; ``group_size``
            -1 for one table per row, else one per row and group).
        p: loss-weight exponent (``U_jj^-p``); 0 gives unweighted k-means.
        init, kmeans_iters, tol, seed, optimal: see :class:`KMeansFitter`.
        percdamp, blocksize, actorder, max_percdamp: GPTQ's.
        threads: torch threads for the call (None: unchanged).
    Returns:
        QuantResult (codes uint8 ``[out, in]`` original order, CodebookGrid values float32
        ``[out, n_groups, 2**bits]`` fp16-representable, sorted per table).
    Raises:
        UnsupportedError: spec is not a free codebook. Others as :func:`gptq_quantize`.
    """
    if spec.kind != GridKind.CODEBOOK or not spec.free_codebook:
        raise UnsupportedError(f"{name}: leanquant_nu expects a free-codebook spec (not "
                               f"{spec.name}, {spec.kind.value}); use leanquant_aff for "
                               "affine, superblock and fixed-table grids")
    fitter = KMeansFitter(init, kmeans_iters, tol, seed, optimal)
    with _threads(threads):
        res = gptq_quantize(W, H, spec, name=name, blocksize=blocksize, percdamp=percdamp,
                            actorder=actorder, static_groups=True, max_percdamp=max_percdamp,
                            fitter=fitter, fit_p=p)
    iters = float(np.mean(fitter.iters)) if fitter.iters else 0.0
    res.stats.update({"method": "leanquant_nu", "p": float(p),
                      "init": "optimal" if optimal else fitter.init_for(spec.bits),
                      "kmeans_iters": kmeans_iters, "kmeans_tol": tol, "seed": seed,
                      "kmeans_iters_mean": round(iters, 3),
                      "seconds_kmeans": round(fitter.seconds, 4)})
    return res


def leanquant_aff_quantize(W: np.ndarray | torch.Tensor, H: np.ndarray | torch.Tensor,
                           spec: GridSpec, *, name: str = "tensor", p: float = 2.0,
                           percdamp: float = 0.1, blocksize: int = 128, actorder: bool = False,
                           static_groups: bool = False, grid_points: int = 10,
                           refine: int = 2, group_fit: str = "updated",
                           max_percdamp: float = 1.0, threads: int | None = None
                           ) -> QuantResult:
    """LeanQuant_aff: GPTQ whose span grids minimise the ``U_jj^-p``-weighted rounding error.

    Args:
        W, H: as :func:`gptq_quantize` (not modified).
        spec: affine (any zero domain), superblock, or fixed-table codebook GridSpec.
        p: loss-weight exponent; grid_points: candidates per axis (see :mod:`grid_search`,
            :mod:`superblock_search`); refine: weighted least-squares rounds.
        percdamp, blocksize, actorder, static_groups, group_fit, max_percdamp: GPTQ's
            (dynamic spans are searched at their first column on the updated W).
        threads: torch threads for the call (None: unchanged).
    Returns:
        QuantResult whose grid satisfies ``spec`` (fp16 scales, integer zeros / sub-scales).
    Raises:
        UnsupportedError: free-codebook spec (use :func:`leanquant_nu_quantize`).
    """
    if spec.kind == GridKind.CODEBOOK and spec.free_codebook:
        raise UnsupportedError(f"{name}: leanquant_aff cannot fit a free codebook "
                               f"({spec.name}); use leanquant_nu")
    fitter = SearchFitter(grid_points, refine)
    with _threads(threads):
        res = gptq_quantize(W, H, spec, name=name, blocksize=blocksize, percdamp=percdamp,
                            actorder=actorder, static_groups=static_groups,
                            group_fit=group_fit, max_percdamp=max_percdamp, fitter=fitter,
                            fit_p=p)
    stats: dict[str, Any] = {"method": "leanquant_aff", "p": float(p),
                             "grid_points": grid_points, "refine": refine,
                             "search_calls": fitter.calls,
                             "seconds_search": round(fitter.seconds, 4)}
    res.stats.update(stats)
    return res
