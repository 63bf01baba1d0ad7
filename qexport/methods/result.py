"""What every quantization method returns, plus the input checks and the objective they share.

A method maps a float weight ``W [out, in]`` onto a GridSpec and returns a :class:`QuantResult`:
uint8 codes in the *original* column order, the grid (parameters already representable in the
spec), and a stats dict that is stored in the IR (JSON-serialisable numbers and strings only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qexport.errors import LoweringError, NumericsError
from qexport.grids import Grid, GridError, GridSpec, dequantize
from qexport.ir import QTensor

__all__ = ["QuantResult", "as_weight_array", "as_weight_tensor", "check_spec_shape",
           "hessian_objective", "span_len"]


@dataclass
class QuantResult:
    """One quantized weight.

    Attributes:
        codes: uint8 ``[out, in]``, original column order (act-order undone).
        grid: per-group parameters satisfying ``spec`` (AffineGrid | SuperBlockGrid |
            CodebookGrid), groups in original column order.
        spec: the GridSpec the codes and grid satisfy.
        stats: method report, JSON-serialisable (``method``, ``objective``, ``damp``,
            ``retries``, ``fp64``, ``static_groups``, ...).
    """

    codes: np.ndarray
    grid: Grid
    spec: GridSpec
    stats: dict[str, Any] = field(default_factory=dict)

    def dequantize(self) -> np.ndarray:
        """float32 ``[out, in]``: ``qexport.grids.dequantize(codes, grid, spec)``."""
        return dequantize(self.codes, self.grid, self.spec)

    def to_qtensor(self, name: str) -> QTensor:
        """The IR tensor ``name``, validated against the spec (raises IRError if not)."""
        qt = QTensor(name=name, codes=self.codes, grid=self.grid, spec=self.spec,
                     stats=dict(self.stats))
        qt.validate()
        return qt


def _check_finite_2d(x: np.ndarray, name: str, what: str) -> None:
    if x.ndim != 2:
        raise NumericsError(f"{name}: {what} expected 2-D (not shape {list(x.shape)})")
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise NumericsError(f"{name}: {what} expected finite values (found {int(bad.sum())} "
                            f"NaN/inf, first at [{r}, {c}] = {x[r, c]})")


def as_weight_array(W: np.ndarray | torch.Tensor, name: str, what: str = "weight") -> np.ndarray:
    """A float32 numpy copy of a 2-D finite array (numpy or torch). Raises NumericsError."""
    arr = W.detach().cpu().float().numpy() if isinstance(W, torch.Tensor) else np.asarray(W)
    arr = np.array(arr, dtype=np.float32, copy=True)
    _check_finite_2d(arr, name, what)
    return arr


def as_weight_tensor(W: np.ndarray | torch.Tensor, name: str, what: str = "weight"
                     ) -> torch.Tensor:
    """A contiguous float32 CPU torch copy of a 2-D finite array. Raises NumericsError."""
    return torch.from_numpy(as_weight_array(W, name, what))


def check_spec_shape(spec: GridSpec, shape: tuple[int, int], name: str) -> None:
    """Raise LoweringError (naming ``name``) if ``spec`` cannot hold a ``[out, in]`` weight."""
    try:
        spec.check_shape(shape, name)
    except GridError as e:
        raise LoweringError(str(e)) from e


def span_len(spec: GridSpec, in_features: int) -> int:
    """Columns fitted together: a superblock, a group, or the whole row (group_size -1)."""
    return in_features if spec.param_span == -1 else spec.param_span


def hessian_objective(W: np.ndarray, Wq: np.ndarray, H: np.ndarray | torch.Tensor) -> float:
    """``tr((W - Wq) H (W - Wq)^T)``: float32 product ``E @ H``, float64 final sum.

    Args:
        W: float32 ``[out, in]`` original weight.
        Wq: float32 ``[out, in]`` quantized (dequantized) weight.
        H: float32 ``[in, in]`` Hessian (GPTQ's ``2/N X^T X``), undamped.
    """
    Hn = H.detach().cpu().float().numpy() if isinstance(H, torch.Tensor) else \
        np.asarray(H, dtype=np.float32)
    E = np.asarray(W, dtype=np.float32) - np.asarray(Wq, dtype=np.float32)
    return float(np.einsum("ij,ij->", (E @ Hn).astype(np.float64), E.astype(np.float64)))
