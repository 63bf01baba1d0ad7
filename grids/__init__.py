"""qexport.grids: numpy-only math of representable weight grids (never imports torch)."""
from .bits import pack_bits, unpack_bits
from .errors import GridError
from .fit import dequantize_span, fit_minmax, quantize_nearest, span_groups
from .grid import (AffineGrid, CodebookGrid, Grid, SuperBlockGrid, concat_grids, dequantize,
                   expand_groups, grid_from_arrays, grid_nbytes_bits, validate)
from .spec import GridKind, GridSpec, ZeroDomain, check_representable, round_to_dtype

__all__ = [
    "AffineGrid", "CodebookGrid", "Grid", "GridError", "GridKind", "GridSpec", "SuperBlockGrid",
    "ZeroDomain", "check_representable", "concat_grids", "dequantize", "dequantize_span",
    "expand_groups", "fit_minmax", "grid_from_arrays", "grid_nbytes_bits", "pack_bits",
    "quantize_nearest", "round_to_dtype", "span_groups", "unpack_bits", "validate",
]
