"""GPTQ (IST-DASLab ``fasterquant``) onto a GridSpec.

The column loop is the reference one (algorithms.md §1): dead columns, optional act-order
permutation, damped inverse-Hessian upper Cholesky factor ``U``, lazy block updates of width
``blocksize``; per column ``q = nearest representable value`` on the current grid,
``err = (w - q) / U[i, i]``, ``W[:, i:] -= err * U[i, i:]``. What changes is the quantizer:
every grid comes from ``qexport.grids.fit_minmax`` (already snapped: fp16 scales, integer
sub-scales) and every code from ``quantize_nearest``, so the value GPTQ optimises is exactly
``grids.dequantize(codes, grid, spec)``.

Spans (columns whose parameters are fitted together: a group; a 256-column superblock for
k-quant specs; the whole row for group_size -1):

| mode                      | when a span's grid is fitted                                   |
|---------------------------|----------------------------------------------------------------|
| per-channel (-1)          | once, on the whole W, before the loop                          |
| dynamic (default)         | at the span's first column, on the already-updated W           |
| static                    | every span up front, from the original W                       |
| act-order + groups        | static (forced, reported): dynamic groups in permuted order    |
|                           | are not contiguous groups of the original order                |

``group_fit="updated"`` fits a dynamic span on the fully updated weights (pending in-block
lazy updates included; results do not depend on ``blocksize`` beyond round-off);
``group_fit="ist"`` reproduces IST-DASLab/AutoGPTQ exactly, which fit on the global ``W``
that lacks the current block's pending updates when a span starts mid-block.

Deliberate differences from IST-DASLab (each visible in stats or an error):

- the per-channel grid is fitted after dead columns are zeroed (IST fits it before);
- symmetric grids use ``scale = 2 max|w| / maxq`` for every group (quant.py keeps
  ``xmin = 0`` for an all-non-negative group, halving its range), as ``qexport.grids`` does;
- act-order + groups uses static groups (IST would need ``g_idx``), see the table;
- act-order sorts stably (ties in ``diag(H)`` keep column order);
- an all-zero Hessian raises NumericsError instead of zeroing the whole weight.

Pluggable span fitter (LeanQuant and other loss-aware grids): ``fitter(spec, W_span, col0,
weights) -> Grid`` replaces ``fit_minmax`` for every span (per-channel, static and dynamic
alike). ``W_span`` is float32 ``[out, span]`` (the original W for per-channel / static spans,
the updated W at the span's first column for dynamic ones; read-only), ``col0`` the span's first
column in original order and ``weights`` float32 ``[span]`` the per-column loss weights
``U_jj^-fit_p`` of the span's columns in original order (``U_jj``: the diagonal of the damped
inverse-Hessian factor in the order the loop visits the columns; clamped to ``[0, 1e30]``; dead
columns 0). ``static_groups=True`` is the "fit every span once, up front, from the original
(un-permuted, dead-masked) W" option. The returned grid must already be representable.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from qexport.errors import InputError, NumericsError
from qexport.grids import (Grid, GridSpec, concat_grids, dequantize, dequantize_span,
                           fit_minmax, quantize_nearest)

from .hessian import fix_dead_columns, inverse_hessian_factor
from .result import QuantResult, as_weight_tensor, check_spec_shape, hessian_objective, span_len

__all__ = ["gptq_quantize", "gptq_on_grid", "GROUP_FIT_MODES", "SpanFitter", "loss_weights"]

GROUP_FIT_MODES = ("updated", "ist")
WEIGHT_CLAMP = 1e30
# fitter(spec, W_span [out, span] f32, col0, weights [span] f32) -> Grid (representable)
SpanFitter = Callable[[GridSpec, np.ndarray, int, np.ndarray], Grid]


def loss_weights(U: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor,
                 p: float) -> np.ndarray:
    """Per-column loss weights ``U_jj^-p`` in original column order (float32 ``[in]``).

    ``U`` is the upper factor in loop (permuted) order, ``perm`` maps loop position -> original
    column, ``dead`` the bool ``[in]`` mask (original order) of dead columns (weight 0).
    Computed in float64 and clamped to ``[0, 1e30]`` so large ``p`` cannot overflow.
    """
    d = torch.diagonal(U).double().numpy()
    with np.errstate(over="ignore", divide="ignore"):
        s = np.exp(-float(p) * np.log(d))
    s = np.clip(np.nan_to_num(s, nan=0.0, posinf=WEIGHT_CLAMP), 0.0, WEIGHT_CLAMP)
    out = np.empty_like(s)
    out[perm.numpy() if perm is not None else np.arange(s.size)] = s
    out[dead.numpy()] = 0.0
    return out.astype(np.float32)


class _Spans:
    """The grid of each span, and which span / offset a (permuted) column falls in.

    Args:
        spec: target spec.
        in_f: columns of the weight.
        perm: int64 ``[in]`` act-order permutation (permuted index -> original), or None.
        fixed: all span grids in original order (per-channel / static), or None (dynamic).
    """

    def __init__(self, spec: GridSpec, in_f: int, perm: np.ndarray | None,
                 fixed: list[Grid] | None, fitter: SpanFitter | None = None,
                 weights: np.ndarray | None = None) -> None:
        self.spec, self.in_f, self.perm = spec, in_f, perm
        self.fitter, self.weights = fitter, weights
        self.L = span_len(spec, in_f)
        self.dynamic = fixed is None
        self.grids: list[Grid | None] = list(fixed) if fixed else [None] * (-(-in_f // self.L))

    def needs_fit(self, col: int) -> bool:
        return self.dynamic and col % self.L == 0

    def fit(self, col: int, W_span: torch.Tensor) -> None:
        # dynamic spans only occur without act-order, so loop column == original column
        self.grids[col // self.L] = _fit_span(self.spec, W_span.numpy(), col, self.fitter,
                                              self.weights)

    def lookup(self, col: int) -> tuple[Grid, int, int]:
        """``(grid, column offset inside its span, span length)`` for permuted column ``col``."""
        o = int(self.perm[col]) if self.perm is not None else col
        k = o // self.L
        return self.grids[k], o - k * self.L, min(self.L, self.in_f - k * self.L)

    def grid(self) -> Grid:
        return concat_grids(self.grids)


def _fit_span(spec: GridSpec, W_span: np.ndarray, col0: int, fitter: SpanFitter | None,
              weights: np.ndarray | None) -> Grid:
    """One span's grid: ``fit_minmax`` or the caller's fitter (given the span's weights)."""
    if fitter is None:
        return fit_minmax(spec, W_span)
    return fitter(spec, W_span, col0, weights[col0:col0 + W_span.shape[1]])


def _fit_all(spec: GridSpec, W: np.ndarray, fitter: SpanFitter | None = None,
             weights: np.ndarray | None = None) -> list[Grid]:
    """Grids of every span of ``W [out, in]`` in original order (static groups, per-channel)."""
    L = span_len(spec, W.shape[1])
    return [_fit_span(spec, W[:, c:c + L], c, fitter, weights)
            for c in range(0, W.shape[1], L)]


def _span_weights(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor,
                  i1: int, i: int, L: int, mode: str) -> torch.Tensor:
    """Current weights ``[out, span]`` of the span starting at column ``i1 + i``.

    ``W1`` holds block ``[i1, i2)`` fully updated; ``W[:, i2:]`` still lacks this block's
    ``Err1[:, :i] @ U[i1:i1+i, i2:]``, which "updated" mode applies to the span's tail.
    """
    col, i2 = i1 + i, i1 + W1.shape[1]
    c1 = min(col + L, W.shape[1])
    if mode == "ist" or i == 0:
        return W[:, col:c1]
    inside = W1[:, i:min(c1, i2) - i1]
    if c1 <= i2:
        return inside
    tail = W[:, i2:c1] - Err1[:, :i].matmul(U[i1:i1 + i, i2:c1])
    return torch.cat([inside, tail], dim=1)


def _column_loop(W: torch.Tensor, U: torch.Tensor, spec: GridSpec, spans: Any,
                 blocksize: int, mode: str, pre: torch.Tensor | None = None
                 ) -> tuple[np.ndarray, torch.Tensor, float]:
    """The lazy-batch GPTQ loop over permuted columns (W is updated in place). ``spans``: a
    :class:`_Spans` or :class:`_FixedGrid`; ``pre`` (float32 ``[out, in]``, permuted order), if
    given, receives every column's updated value at the moment it is rounded.

    Returns:
        uint8 codes ``[out, in]`` and float32 values ``Q [out, in]`` (both permuted order),
        and GPTQ's own loss ``sum((w - q)^2 / U_ii^2) / 2``.
    """
    out_f, n = W.shape
    codes = np.empty((out_f, n), dtype=np.uint8)
    Q = torch.empty_like(W)
    loss = 0.0
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if spans.needs_fit(i1 + i):
                spans.fit(i1 + i, _span_weights(W, W1, Err1, U, i1, i, spans.L, mode))
            grid, c0, sl = spans.lookup(i1 + i)
            w = W1[:, i]
            if pre is not None:
                pre[:, i1 + i] = w
            c = quantize_nearest(spec, grid, w.numpy()[:, None], c0, sl)
            q = torch.from_numpy(dequantize_span(spec, grid, c, c0, sl)[:, 0])
            codes[:, i1 + i] = c[:, 0]
            Q[:, i1 + i] = q
            err1 = (w - q) / U1[i, i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(U1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
        loss += float((Err1.double() ** 2).sum()) / 2
    return codes, Q, loss


def _check_args(blocksize: int, group_fit: str, name: str) -> None:
    if blocksize < 1:
        raise InputError(f"{name}: gptq blocksize expected >= 1 (not {blocksize})")
    if group_fit not in GROUP_FIT_MODES:
        raise InputError(f"{name}: group_fit expected one of {GROUP_FIT_MODES} "
                         f"(not {group_fit!r})")


def _inputs(W: np.ndarray | torch.Tensor, H: np.ndarray | torch.Tensor, spec: GridSpec,
            name: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """Checked float32 working copies ``W [out, in]``, ``H [in, in]`` plus untouched originals
    (for the objective). Raises NumericsError / LoweringError / InputError."""
    Wt = as_weight_tensor(W, name)
    out_f, in_f = Wt.shape
    check_spec_shape(spec, (out_f, in_f), name)
    Ht = as_weight_tensor(H, name, "Hessian")
    if tuple(Ht.shape) != (in_f, in_f):
        raise InputError(f"{name}: Hessian expected shape [{in_f}, {in_f}] "
                         f"(not {list(Ht.shape)})")
    return Wt, Ht, Wt.numpy().copy(), Ht.clone()


def _fit_upfront(spec: GridSpec, actorder: bool, static_groups: bool,
                 stats: dict[str, Any]) -> bool:
    """Whether span grids are fitted before the loop (per-channel, static groups); records
    ``static_groups`` (and the reason when act-order forces it) in ``stats``."""
    per_channel = spec.param_span == -1
    static = static_groups and not per_channel
    if actorder and not per_channel and not static:
        static = True
        stats["static_groups_reason"] = ("act-order with groups: dynamic groups in permuted "
                                         "order are not contiguous groups of the original "
                                         "column order, so static groups were used")
    stats["static_groups"] = static
    return per_channel or static


def gptq_quantize(W: np.ndarray | torch.Tensor, H: np.ndarray | torch.Tensor, spec: GridSpec,
                  *, name: str = "tensor", blocksize: int = 128, percdamp: float = 0.01,
                  actorder: bool = False, static_groups: bool = False,
                  group_fit: str = "updated", max_percdamp: float = 1.0,
                  fitter: SpanFitter | None = None, fit_p: float = 4.0) -> QuantResult:
    """GPTQ-quantize ``W`` onto ``spec`` (CPU, float32).

    Args:
        W: float32 ``[out, in]`` weight (numpy or torch; not modified).
        H: float32 ``[in, in]`` Hessian ``2/N sum x x^T`` (not modified).
        spec: target GridSpec (affine, superblock or codebook).
        name: tensor name used in errors.
        blocksize: lazy-update block width.
        percdamp: first relative damp; see :func:`inverse_hessian_factor` for the retries.
        actorder: quantize columns in order of decreasing ``diag(H)``; codes are stored in
            original order. With groups this forces static groups (reported in stats).
        static_groups: fit every span's grid from the original W up front.
        group_fit: "updated" or "ist" (see the module docstring).
        max_percdamp: largest relative damp tried before the fp64 attempt.
        fitter: span fitter replacing ``fit_minmax`` (see the module docstring); None keeps
            GPTQ's min-max grids.
        fit_p: exponent of the loss weights ``U_jj^-fit_p`` handed to ``fitter``.
    Returns:
        QuantResult with stats: objective ``tr((W-Q) H (W-Q)^T)``, gptq_loss, damp, percdamp,
        retries, fp64, dead_columns, actorder, static_groups (+ reason), timings.
    Raises:
        NumericsError: NaN/inf in W or H, all-zero H, or a Hessian no damp makes factorable.
        LoweringError: the spec cannot hold the shape. InputError: bad arguments.
    """
    t0 = time.perf_counter()
    _check_args(blocksize, group_fit, name)
    Wt, Ht, W_orig, H_orig = _inputs(W, H, spec, name)
    dead = fix_dead_columns(Ht, Wt)
    if bool(dead.all()):
        raise NumericsError(f"{name}: Hessian is all zero on its diagonal: no calibration "
                            "signal reached this tensor (expected a nonzero Hessian; use RTN)")
    stats: dict[str, Any] = {"method": "gptq", "blocksize": blocksize, "actorder": actorder,
                             "group_fit": group_fit, "dead_columns": int(dead.sum())}
    upfront = _fit_upfront(spec, actorder, static_groups, stats)
    W0 = Wt                                   # dead-masked, original order (not modified)
    perm = None
    if actorder:
        perm = torch.argsort(torch.diagonal(Ht), descending=True, stable=True)
        Wt, Ht = Wt[:, perm].contiguous(), Ht[perm][:, perm]
    U, hrep = inverse_hessian_factor(Ht, name=name, percdamp=percdamp,
                                     max_percdamp=max_percdamp)
    stats.update(hrep)
    weights = loss_weights(U, perm, dead, fit_p) if fitter is not None else None
    fixed = _fit_all(spec, W0.numpy(), fitter, weights) if upfront else None
    t1 = time.perf_counter()
    spans = _Spans(spec, Wt.shape[1], perm.numpy() if perm is not None else None, fixed,
                   fitter, weights)
    codes, Qv, loss = _column_loop(Wt, U, spec, spans, blocksize, group_fit)
    t2 = time.perf_counter()
    if perm is not None:
        inv = torch.argsort(perm).numpy()
        codes, Qv = np.ascontiguousarray(codes[:, inv]), Qv[:, inv]
    grid = spans.grid()
    deq = dequantize(codes, grid, spec)
    if not np.array_equal(deq, Qv.numpy()):
        raise NumericsError(f"{name}: internal error: GPTQ's loop values differ from "
                            f"grids.dequantize at {int((deq != Qv.numpy()).sum())} weights")
    stats.update({"objective": hessian_objective(W_orig, deq, H_orig), "gptq_loss": loss,
                  "seconds_factor": round(t1 - t0, 4), "seconds_loop": round(t2 - t1, 4),
                  "seconds": round(time.perf_counter() - t0, 4)})
    return QuantResult(codes=codes, grid=grid, spec=spec, stats=stats)


class _FixedGrid:
    """Span lookup for a whole-tensor grid given up front (:func:`gptq_on_grid`)."""

    def __init__(self, grid: Grid, in_f: int, perm: np.ndarray | None) -> None:
        self._grid, self.in_f, self.perm, self.L = grid, in_f, perm, in_f

    def needs_fit(self, col: int) -> bool:
        return False

    def lookup(self, col: int) -> tuple[Grid, int, int]:
        return self._grid, int(self.perm[col]) if self.perm is not None else col, self.in_f

    def grid(self) -> Grid:
        return self._grid


def gptq_on_grid(W: np.ndarray | torch.Tensor, H: np.ndarray | torch.Tensor, spec: GridSpec,
                 grid: Grid, *, name: str = "tensor", blocksize: int = 128,
                 percdamp: float = 0.01, actorder: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """GPTQ's column loop on a grid fixed beforehand (e.g. TesseraQ's), keeping the weights it
    rounds.

    Args:
        W: float32 ``[out, in]``; H: float32 ``[in, in]`` Hessian; grid: ``W``'s whole-tensor
            grid on ``spec``.
    Returns:
        ``(codes, W_pre, stats)``: uint8 codes ``[out, in]``, float32 ``W_pre [out, in]`` (every
        column's error-updated value when GPTQ rounded it, so ``codes`` is the nearest code of
        ``W_pre``; dead columns 0), both in original column order, and the damping report.
    """
    Wt, Ht, _, _ = _inputs(W, H, spec, name)
    fix_dead_columns(Ht, Wt)
    perm = torch.argsort(torch.diagonal(Ht), descending=True, stable=True) if actorder else None
    if perm is not None:
        Wt, Ht = Wt[:, perm].contiguous(), Ht[perm][:, perm]
    U, hrep = inverse_hessian_factor(Ht, name=name, percdamp=percdamp)
    pre = torch.empty_like(Wt)
    spans = _FixedGrid(grid, Wt.shape[1], perm.numpy() if perm is not None else None)
    codes, _, _ = _column_loop(Wt, U, spec, spans, blocksize, "updated", pre)
    if perm is not None:
        inv = torch.argsort(perm).numpy()
        codes, pre = np.ascontiguousarray(codes[:, inv]), pre[:, inv]
    return codes, pre.numpy().astype(np.float32), hrep
