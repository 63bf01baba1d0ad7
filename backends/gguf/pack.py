"""Pack IR tensors (codes + grid on a GGUF GridSpec) into GGUF block bytes.

The packers are hand-written: gguf-py (PyPI ``gguf``) can *decode* every type but packs none of
the k-quants or IQ4 types, so qexport writes the byte layouts itself (llama.cpp
``ggml-common.h`` structs, placement as in ``docs/gguf-format.md`` section 1.2) and checks them
against ``gguf.quants.dequantize`` in the tests. Every packer is vectorised over all blocks.

``pack_tensor(codes, grid, spec)`` -> uint8 ``[out, in // block * type_size]``, one row per
output row, ready for ``GGUFWriter.add_tensor(name, raw, raw_dtype=row.ggml_type)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qexport.errors import LoweringError, UnsupportedError
from qexport.grids import AffineGrid, CodebookGrid, Grid, GridError, GridSpec, SuperBlockGrid
from qexport.grids import validate

from .pack_kquants import pack_iq4_xs, pack_q2_k, pack_q3_k, pack_q4_k, pack_q5_k, pack_q6_k
from .pack_legacy import pack_iq4_nl, pack_q4_0, pack_q4_1, pack_q5_0, pack_q5_1, pack_q8_0
from .types import GGUFType, type_for_spec

__all__ = ["pack_tensor", "pack_blocks"]

# name -> packer(codes [out, nb, block] uint8, params) -> bytes [out, nb, type_size]
_LEGACY: dict[str, Callable[..., np.ndarray]] = {
    "Q4_0": pack_q4_0, "Q5_0": pack_q5_0, "Q8_0": pack_q8_0,
    "Q4_1": pack_q4_1, "Q5_1": pack_q5_1,
}
_SUPER: dict[str, Callable[..., np.ndarray]] = {
    "Q2_K": pack_q2_k, "Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k,
    "Q6_K": pack_q6_k, "IQ4_XS": pack_iq4_xs,
}


def _check(codes: np.ndarray, grid: Grid, spec: GridSpec, name: str) -> GGUFType:
    try:
        row = type_for_spec(spec)
    except UnsupportedError as e:               # a spec that is not one of GGUF's
        raise LoweringError(f"{name}: {e}") from e
    try:
        validate(codes, grid, spec, where=name)
    except GridError as e:
        raise LoweringError(f"cannot store {name} as GGUF {row.name}: {e}") from e
    return row


def pack_blocks(codes: np.ndarray, grid: Grid, row: GGUFType) -> np.ndarray:
    """Pack already-validated IR into uint8 ``[out, n_blocks, type_size]``."""
    out_f, in_f = codes.shape
    nb = in_f // row.block_size
    c = np.ascontiguousarray(codes).reshape(out_f, nb, row.block_size)
    if isinstance(grid, AffineGrid):
        if row.name in ("Q4_1", "Q5_1"):
            return _LEGACY[row.name](c, grid.scales, grid.mins)
        return _LEGACY[row.name](c, grid.scales)
    if isinstance(grid, CodebookGrid):
        return pack_iq4_nl(c, grid.scales)
    if not isinstance(grid, SuperBlockGrid):
        raise LoweringError(f"GGUF {row.name}: unexpected grid {type(grid).__name__}")
    per = row.block_size // row.spec.group_size
    sc = grid.sc.reshape(out_f, nb, per)
    m = None if grid.m is None else grid.m.reshape(out_f, nb, per)
    return _SUPER[row.name](c, grid.d, sc, grid.dmin, m)


def pack_tensor(codes: np.ndarray, grid: Grid, spec: GridSpec,
                name: str = "tensor") -> np.ndarray:
    """Lower one IR tensor to GGUF bytes without changing a value.

    Args:
        codes: uint8 ``[out, in]`` codes in original column order.
        grid: the tensor's grid (AffineGrid / SuperBlockGrid / CodebookGrid).
        spec: one of the GGUF specs (``types.spec_for(...)``).
        name: tensor name used in error messages.
    Returns:
        uint8 ``[out, in // block_size * type_size]``.
    Raises:
        LoweringError: naming the tensor, if the IR does not satisfy the spec (row length,
            code range, parameter shapes, values not representable in fp16, ...).
    """
    row = _check(codes, grid, spec, name)
    raw = pack_blocks(codes, grid, row)
    return raw.reshape(codes.shape[0], -1)
