"""GridSpecs shared by the grids and methods tests: every affine family plus k-quant- and
IQ-like specs built directly with GridSpec (no backend tables, so the tests of the IR and the
methods do not depend on a backend), and a helper that runs RTN per span."""
from __future__ import annotations

import numpy as np

from qexport.grids import (GridKind, GridSpec, ZeroDomain, concat_grids, fit_minmax,
                           quantize_nearest)

IQ4_TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

SUPER_SPECS = {
    "q2_k": GridSpec(name="q2_k-like", kind=GridKind.SUPERBLOCK, bits=2, group_size=16,
                     super_size=256, zero=ZeroDomain.FLOAT, sub_scale_range=(0, 15),
                     sub_min_range=(0, 15), row_multiple=256),
    "q3_k": GridSpec(name="q3_k-like", kind=GridKind.SUPERBLOCK, bits=3, group_size=16,
                     super_size=256, code_offset=4, sub_scale_range=(-32, 31), row_multiple=256),
    "q4_k": GridSpec(name="q4_k-like", kind=GridKind.SUPERBLOCK, bits=4, group_size=32,
                     super_size=256, zero=ZeroDomain.FLOAT, sub_scale_range=(0, 63),
                     sub_min_range=(0, 63), row_multiple=256),
    "q5_k": GridSpec(name="q5_k-like", kind=GridKind.SUPERBLOCK, bits=5, group_size=32,
                     super_size=256, zero=ZeroDomain.FLOAT, sub_scale_range=(0, 63),
                     sub_min_range=(0, 63), row_multiple=256),
    "q6_k": GridSpec(name="q6_k-like", kind=GridKind.SUPERBLOCK, bits=6, group_size=16,
                     super_size=256, code_offset=32, sub_scale_range=(-128, 127),
                     row_multiple=256),
    "iq4_xs": GridSpec(name="iq4_xs-like", kind=GridKind.SUPERBLOCK, bits=4, group_size=32,
                       super_size=256, table=IQ4_TABLE, sub_scale_range=(-32, 31),
                       row_multiple=256),
}
#: one spec per kind for the method tests (GPTQ, LeanQuant): affine sym / asym, two k-quants
#: (with mins, signed scales), a fixed table
METHOD_SPECS = {
    "w4g128s": GridSpec.affine(4, 128, True),
    "w3g128a": GridSpec.affine(3, 128, False),
    "q4_k": SUPER_SPECS["q4_k"],
    "q6_k": SUPER_SPECS["q6_k"],
    "iq4_nl": GridSpec(name="iq4_nl-like", kind=GridKind.CODEBOOK, bits=4, group_size=32,
                       table=IQ4_TABLE),
}
CODEBOOK_SPECS = {
    "iq4_nl": GridSpec(name="iq4_nl-like", kind=GridKind.CODEBOOK, bits=4, group_size=32,
                       table=IQ4_TABLE),
    "free2": GridSpec(name="free2", kind=GridKind.CODEBOOK, bits=2, group_size=-1,
                      free_codebook=True),
    "free4g32": GridSpec(name="free4", kind=GridKind.CODEBOOK, bits=4, group_size=32,
                         free_codebook=True),
}


def affine_spec(bits: int, zero: str, group: int) -> GridSpec:
    """zero: "sym" (NONE), "asym" (INT zero) or "fmin" (FLOAT min, Q4_1 style)."""
    z = {"sym": ZeroDomain.NONE, "asym": ZeroDomain.INT, "fmin": ZeroDomain.FLOAT}[zero]
    return GridSpec.affine(bits, group, zero == "sym", zero=z)


def span_of(spec: GridSpec, in_f: int) -> int:
    return in_f if spec.param_span == -1 else spec.param_span


def rtn(spec: GridSpec, W: np.ndarray):
    """Per span: fit_minmax + quantize_nearest. Returns (codes, grid, span grids)."""
    L = span_of(spec, W.shape[1])
    codes, grids = [], []
    for c in range(0, W.shape[1], L):
        blk = W[:, c:c + L]
        g = fit_minmax(spec, blk)
        codes.append(quantize_nearest(spec, g, blk, 0, span=blk.shape[1]))
        grids.append(g)
    return np.concatenate(codes, axis=1), concat_grids(grids), grids
