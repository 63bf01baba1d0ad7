"""llama.cpp's own quantizers (what ``llama-quantize`` stores), producing qexport IR.

``llamacpp_quantize(W, type, imatrix)`` re-implements ``quantize_q4_0`` ... ``quantize_q6_K``,
``quantize_iq4_nl`` and ``quantize_iq4_xs`` of llama.cpp ``ggml/src/ggml-quants.c`` (the
version vendored by llama-cpp-python 0.3.36) in vectorised numpy float32, following its
operation order, ``nearest_int`` (ties to even) and integer wrap-arounds, so that packing the
result gives llama-quantize's bytes. Without an imatrix these are the ``quantize_row_*_ref``
paths; with one, the ``quantize_row_*_impl`` paths with ``quant_weights`` = the imatrix
(mean squared activation per input column, ``[in]``). Q8_0 ignores the imatrix, as llama.cpp
does. The result is an IR tensor on ``spec_for(type)``: ``grids.dequantize`` of it equals
llama.cpp's (and gguf-py's) decode of the bytes, by construction.

Used as the "llama.cpp baseline" (RTN / imatrix-RTN) and as the starting grid for methods that
refine llama.cpp's choice.
"""
from __future__ import annotations

import numpy as np

from qexport.errors import InputError, LoweringError, NumericsError
from qexport.grids import AffineGrid, CodebookGrid, Grid, GridError, SuperBlockGrid, validate

from .llamacpp_kquants import (quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k,
                               quantize_q6_k)
from .llamacpp_legacy import quantize_iq4_nl, quantize_iq4_xs, quantize_legacy
from .types import GGUFType, gguf_type

__all__ = ["llamacpp_quantize", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 19          # rows are processed in chunks of about this many weights
_KQUANTS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k,
            "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def _check_inputs(W: np.ndarray, imatrix: np.ndarray | None, row: GGUFType,
                  name: str) -> tuple[np.ndarray, np.ndarray | None]:
    W = np.asarray(W)
    if W.ndim != 2 or W.size == 0:
        raise InputError(f"{name}: expected a non-empty 2-D [out, in] weight (not shape "
                         f"{list(W.shape)})")
    W = np.ascontiguousarray(W, dtype=np.float32)
    if W.shape[1] % row.block_size:
        raise LoweringError(f"{name}: GGUF {row.name} needs in_features divisible by "
                            f"{row.block_size} (found {W.shape[1]})")
    if not np.all(np.isfinite(W)):
        raise NumericsError(f"{name}: expected finite weights (found "
                            f"{int(np.sum(~np.isfinite(W)))} NaN/inf)")
    if imatrix is None:
        return W, None
    im = np.asarray(imatrix, dtype=np.float32)
    if im.shape != (W.shape[1],):
        raise InputError(f"{name}: imatrix expected shape [{W.shape[1]}] "
                         f"(not {list(im.shape)})")
    if not np.all(np.isfinite(im)) or np.any(im < 0):
        raise NumericsError(f"{name}: imatrix expected finite non-negative values")
    return W, im


def _quantize_chunk(W: np.ndarray, row: GGUFType, im: np.ndarray | None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Quantize rows ``W [r, in]``; returns codes ``[r, in]`` and grid arrays (IR shapes)."""
    r, n = W.shape
    if row.name in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        res = quantize_legacy(W, row.name, im)
        arrays = {"scales": res[1]}
        if len(res) == 3:
            arrays["mins"] = res[2]
        return res[0], arrays
    if row.name == "IQ4_NL":
        qw = None if im is None else np.broadcast_to(im, W.shape).reshape(-1, 32)
        codes, d = quantize_iq4_nl(W.reshape(-1, 32), qw)
        return codes.reshape(r, n), {"scales": d.reshape(r, n // 32)}
    x = W.reshape(-1, 256)
    qw = None if im is None else np.ascontiguousarray(np.broadcast_to(im, W.shape)).reshape(-1, 256)
    if row.name == "IQ4_XS":
        codes, d, sc = quantize_iq4_xs(x, qw)
        dmin = m = None
    else:
        codes, d, sc, dmin, m = _KQUANTS[row.name](x, qw)
    arrays = {"d": d.reshape(r, -1), "sc": sc.reshape(r, -1).astype(np.int16)}
    if dmin is not None:
        arrays["dmin"] = dmin.reshape(r, -1)
        arrays["m"] = m.reshape(r, -1).astype(np.int16)
    return codes.reshape(r, n), arrays


def _make_grid(row: GGUFType, arrays: dict[str, np.ndarray]) -> Grid:
    a = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    if row.spec.kind.value == "affine":
        return AffineGrid(**a)
    if row.spec.kind.value == "codebook":
        return CodebookGrid(**a)
    return SuperBlockGrid(**a)


def llamacpp_quantize(W: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
                      name: str = "tensor") -> tuple[np.ndarray, Grid]:
    """Quantize ``W`` exactly as llama.cpp's ``quantize_<type>`` would.

    Args:
        W: float32 ``[out, in]`` (HF orientation; blocks run along ``in``).
        type_name: one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS.
        imatrix: float32 ``[in]`` importance (llama.cpp imatrix: mean x^2 per column) or None.
        name: tensor name for error messages.
    Returns:
        (codes uint8 ``[out, in]``, grid) satisfying ``spec_for(type_name)``.
    Raises:
        LoweringError if the row length is not a block multiple; NumericsError for non-finite
        weights or a scale that overflows fp16.
    """
    row = gguf_type(type_name)
    W, im = _check_inputs(W, imatrix, row, name)
    out_f, in_f = W.shape
    step = max(1, CHUNK_ELEMENTS // max(in_f, 1))
    codes_parts, array_parts = [], []
    with np.errstate(all="ignore"):
        for r0 in range(0, out_f, step):
            c, arrs = _quantize_chunk(W[r0:r0 + step], row, im)
            codes_parts.append(c)
            array_parts.append(arrs)
    codes = np.concatenate(codes_parts, axis=0)
    grid = _make_grid(row, {k: np.concatenate([p[k] for p in array_parts])
                            for k in array_parts[0]})
    try:
        validate(codes, grid, row.spec, where=name)
    except GridError as e:
        raise NumericsError(f"{name}: llama.cpp's {row.name} quantizer gives a grid GGUF "
                            f"cannot store: {e}") from e
    return codes, grid
