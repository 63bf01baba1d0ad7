"""Round-to-nearest onto a GridSpec: min-max fit per span, then nearest code."""
from __future__ import annotations

import time

import numpy as np
import torch

from qexport.grids import GridSpec, concat_grids, fit_minmax, quantize_nearest

from .result import QuantResult, as_weight_array, check_spec_shape, span_len

__all__ = ["rtn_quantize"]


def rtn_quantize(W: np.ndarray | torch.Tensor, spec: GridSpec, *, name: str = "tensor"
                 ) -> QuantResult:
    """Quantize ``W`` (float32 ``[out, in]``) by round-to-nearest on min-max grids.

    Each span of ``spec.param_span`` columns (a group; a 256-column superblock for k-quant
    specs; the whole row for ``group_size == -1``) gets ``fit_minmax`` parameters and
    ``quantize_nearest`` codes; a ragged last span is allowed where the spec allows it.

    Raises:
        NumericsError: ``W`` is not 2-D or holds NaN/inf.
        LoweringError: the spec cannot hold the shape (row multiple, group divisibility).
    """
    t0 = time.perf_counter()
    Wn = as_weight_array(W, name)
    out_f, in_f = Wn.shape
    check_spec_shape(spec, (out_f, in_f), name)
    L = span_len(spec, in_f)
    codes = np.empty((out_f, in_f), dtype=np.uint8)
    grids = []
    for c0 in range(0, in_f, L):
        c1 = min(c0 + L, in_f)
        g = fit_minmax(spec, Wn[:, c0:c1])
        codes[:, c0:c1] = quantize_nearest(spec, g, Wn[:, c0:c1], 0, span=c1 - c0)
        grids.append(g)
    stats = {"method": "rtn", "seconds": round(time.perf_counter() - t0, 4)}
    return QuantResult(codes=codes, grid=concat_grids(grids), spec=spec, stats=stats)
