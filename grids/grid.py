"""The three grid kinds of the IR and their reference decoder (numpy only).

Every grid holds the per-group parameters of one ``[out, in]`` weight; ``codes`` (uint8
``[out, in]``, original column order) live beside it in the QTensor. Group ``g`` covers columns
``[g * L, min((g + 1) * L, in))`` with ``L = spec.group_len(in)``; the last group may be ragged.
:func:`dequantize` is *the* definition of a quantized tensor's value: backends' decoders and
the runtimes are compared against it bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .errors import GridError
from .spec import GridKind, GridSpec, ZeroDomain, check_representable

__all__ = ["AffineGrid", "SuperBlockGrid", "CodebookGrid", "Grid", "dequantize", "validate",
           "expand_groups", "grid_from_arrays", "concat_grids", "grid_nbytes_bits"]


@dataclass
class AffineGrid:
    """Per-group affine parameters.

    Attributes:
        scales: float32 ``[out, n_groups]`` (representable in ``spec.scale_dtype``).
        zeros: uint8 ``[out, n_groups]`` integer zero points (ZeroDomain.INT), else None.
        mins: float32 ``[out, n_groups]`` float offsets (ZeroDomain.FLOAT), else None.
    """

    scales: np.ndarray
    zeros: np.ndarray | None = None
    mins: np.ndarray | None = None
    kind: GridKind = field(default=GridKind.AFFINE, init=False)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.mins is not None:
            out["mins"] = self.mins
        return out


@dataclass
class SuperBlockGrid:
    """Double-quantized k-quant style parameters.

    Attributes:
        d: float32 ``[out, n_super]`` super-scales (fp16-representable, may be negative).
        sc: int16 ``[out, n_groups]`` integer sub-scales within ``spec.sub_scale_range``.
        dmin: float32 ``[out, n_super]`` super-scale of the mins, or None.
        m: int16 ``[out, n_groups]`` integer sub-mins within ``spec.sub_min_range``, or None.
    """

    d: np.ndarray
    sc: np.ndarray
    dmin: np.ndarray | None = None
    m: np.ndarray | None = None
    kind: GridKind = field(default=GridKind.SUPERBLOCK, init=False)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"d": self.d, "sc": self.sc}
        if self.dmin is not None:
            out["dmin"] = self.dmin
            out["m"] = self.m
        return out


@dataclass
class CodebookGrid:
    """Non-uniform grids.

    Attributes:
        values: float32 ``[out, n_groups, 2**bits]`` learned value tables (free codebook), or
            None for a fixed table.
        scales: float32 ``[out, n_groups]`` per-group scale of the spec's fixed ``table``
            (IQ4_NL), or None for a free codebook.
    """

    values: np.ndarray | None = None
    scales: np.ndarray | None = None
    kind: GridKind = field(default=GridKind.CODEBOOK, init=False)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in (("values", self.values), ("scales", self.scales))
                if v is not None}


Grid = Union[AffineGrid, SuperBlockGrid, CodebookGrid]
_ARRAY_DTYPES = {"scales": np.float32, "mins": np.float32, "zeros": np.uint8, "d": np.float32,
                 "dmin": np.float32, "sc": np.int16, "m": np.int16, "values": np.float32}


def grid_from_arrays(kind: GridKind, arrays: dict[str, np.ndarray], where: str = "grid") -> Grid:
    """Rebuild a grid from its named arrays (as saved in the IR), checking names and dtypes."""
    allowed = {GridKind.AFFINE: ({"scales"}, {"zeros", "mins"}),
               GridKind.SUPERBLOCK: ({"d", "sc"}, {"dmin", "m"}),
               GridKind.CODEBOOK: (set(), {"values", "scales"})}[kind]
    names = set(arrays)
    if not allowed[0] <= names or not names <= allowed[0] | allowed[1]:
        raise GridError(f"{where}: {kind.value} grid expected arrays {sorted(allowed[0])} plus "
                        f"optional {sorted(allowed[1])} (found {sorted(names)})")
    for k, v in arrays.items():
        if v.dtype != _ARRAY_DTYPES[k]:
            raise GridError(f"{where}.{k}: expected dtype {np.dtype(_ARRAY_DTYPES[k])} "
                            f"(not {v.dtype})")
    cls = {GridKind.AFFINE: AffineGrid, GridKind.SUPERBLOCK: SuperBlockGrid,
           GridKind.CODEBOOK: CodebookGrid}[kind]
    return cls(**arrays)


def expand_groups(p: np.ndarray, group_len: int, in_features: int) -> np.ndarray:
    """Repeat per-group parameters ``[out, n_groups, ...]`` to per-column ``[out, in, ...]``."""
    return np.repeat(p, group_len, axis=1)[:, :in_features]


def _table_value(spec: GridSpec, codes: np.ndarray) -> np.ndarray:
    """T(code) as float32: ``table[code]`` or ``code - code_offset``."""
    if spec.table is not None:
        return np.asarray(spec.table, dtype=np.float32)[codes]
    return (codes.astype(np.int32) - spec.code_offset).astype(np.float32)


def dequantize(codes: np.ndarray, grid: Grid, spec: GridSpec) -> np.ndarray:
    """Reference decoder: uint8 codes ``[out, in]`` -> float32 weights ``[out, in]``.

    The fp32 operation order is fixed (see the table in ``spec``), so any decoder that follows
    the target's own formula (gguf-py, onnxruntime, compressed-tensors) matches bit for bit.
    """
    out_f, in_f = codes.shape
    L = spec.group_len(in_f)
    if isinstance(grid, AffineGrid):
        s = expand_groups(grid.scales, L, in_f)
        if spec.zero == ZeroDomain.NONE:
            return s * _table_value(spec, codes)
        if spec.zero == ZeroDomain.INT:
            z = expand_groups(grid.zeros, L, in_f).astype(np.int32)
            return s * (codes.astype(np.int32) - z).astype(np.float32)
        return s * codes.astype(np.float32) + expand_groups(grid.mins, L, in_f)
    if isinstance(grid, SuperBlockGrid):
        per = spec.super_size // spec.group_size
        d = np.repeat(grid.d, per, axis=1)
        eff = d * grid.sc.astype(np.float32)
        x = expand_groups(eff, L, in_f) * _table_value(spec, codes)
        if grid.dmin is not None:
            effm = np.repeat(grid.dmin, per, axis=1) * grid.m.astype(np.float32)
            x = x - expand_groups(effm, L, in_f)
        return x
    if grid.values is not None:
        vals = expand_groups(grid.values, L, in_f)               # [out, in, K]
        return np.take_along_axis(vals, codes[..., None].astype(np.intp), axis=-1)[..., 0]
    return expand_groups(grid.scales, L, in_f) * _table_value(spec, codes)


def _expect(arr: np.ndarray | None, shape: tuple[int, ...], name: str, where: str) -> None:
    if arr is None:
        raise GridError(f"{where}.{name}: missing (expected shape {list(shape)})")
    if tuple(arr.shape) != shape:
        raise GridError(f"{where}.{name}: expected shape {list(shape)} (not {list(arr.shape)})")


def _expect_range(arr: np.ndarray, rng: tuple[int, int], name: str, where: str) -> None:
    if arr.size and (int(arr.min()) < rng[0] or int(arr.max()) > rng[1]):
        raise GridError(f"{where}.{name}: expected integers in [{rng[0]}, {rng[1]}] (found "
                        f"[{int(arr.min())}, {int(arr.max())}])")


def validate(codes: np.ndarray, grid: Grid, spec: GridSpec, where: str = "tensor") -> None:
    """Raise GridError (naming ``where`` and the field) unless codes + grid satisfy ``spec``."""
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise GridError(f"{where}.codes: expected a 2-D uint8 array (not {codes.ndim}-D "
                        f"{codes.dtype})")
    out_f, in_f = codes.shape
    spec.check_shape((out_f, in_f), where)
    _expect_range(codes, (0, spec.maxq), "codes", where)
    if grid.kind != spec.kind:
        raise GridError(f"{where}: spec {spec.name} expects a {spec.kind.value} grid "
                        f"(not {grid.kind.value})")
    for k, v in grid.arrays().items():          # float64 scales would decode in float64
        if np.asarray(v).dtype != _ARRAY_DTYPES[k]:
            raise GridError(f"{where}.{k}: expected dtype {np.dtype(_ARRAY_DTYPES[k])} "
                            f"(not {np.asarray(v).dtype})")
    ng = spec.n_groups(in_f)
    if isinstance(grid, AffineGrid):
        _expect(grid.scales, (out_f, ng), "scales", where)
        check_representable(grid.scales, spec.scale_dtype, f"{where}.scales")
        want_z, want_m = spec.zero == ZeroDomain.INT, spec.zero == ZeroDomain.FLOAT
        if (grid.zeros is not None) != want_z or (grid.mins is not None) != want_m:
            raise GridError(f"{where}: zero domain {spec.zero.value} expects "
                            f"{'zeros' if want_z else 'mins' if want_m else 'no zero arrays'}")
        if want_z:
            _expect(grid.zeros, (out_f, ng), "zeros", where)
            _expect_range(grid.zeros, spec.zero_range, "zeros", where)
        if want_m:
            _expect(grid.mins, (out_f, ng), "mins", where)
            check_representable(grid.mins, spec.scale_dtype, f"{where}.mins")
    elif isinstance(grid, SuperBlockGrid):
        ns = in_f // spec.super_size
        _expect(grid.d, (out_f, ns), "d", where)
        _expect(grid.sc, (out_f, ng), "sc", where)
        check_representable(grid.d, spec.scale_dtype, f"{where}.d")
        _expect_range(grid.sc, spec.sub_scale_range, "sc", where)
        if (grid.dmin is not None) != (spec.sub_min_range is not None):
            raise GridError(f"{where}: spec {spec.name} "
                            f"{'expects' if spec.sub_min_range else 'has no'} dmin/m")
        if grid.dmin is not None:
            _expect(grid.dmin, (out_f, ns), "dmin", where)
            _expect(grid.m, (out_f, ng), "m", where)
            check_representable(grid.dmin, spec.scale_dtype, f"{where}.dmin")
            _expect_range(grid.m, spec.sub_min_range, "m", where)
    else:
        if spec.free_codebook:
            _expect(grid.values, (out_f, ng, 2 ** spec.bits), "values", where)
            check_representable(grid.values, spec.scale_dtype, f"{where}.values")
        else:
            if spec.table is None:
                raise GridError(f"{where}: codebook spec {spec.name} has neither a table nor "
                                "free_codebook")
            _expect(grid.scales, (out_f, ng), "scales", where)
            check_representable(grid.scales, spec.scale_dtype, f"{where}.scales")


def concat_grids(grids: list[Grid]) -> Grid:
    """Concatenate grids of consecutive column spans along the group axis."""
    first = grids[0]
    cat = {}
    for k in first.arrays():
        cat[k] = np.concatenate([g.arrays()[k] for g in grids], axis=1)
    return grid_from_arrays(first.kind, cat)


def grid_nbytes_bits(grid: Grid, spec: GridSpec) -> int:
    """Bits the grid's parameters occupy when stored as the spec says (scales in their dtype,
    integer fields in their bit width)."""
    fbits = {"fp16": 16, "bf16": 16, "fp32": 32}[spec.scale_dtype]
    total = 0
    for k, v in grid.arrays().items():
        if k in ("scales", "mins", "d", "dmin", "values"):
            total += v.size * fbits
        elif k == "zeros":
            total += v.size * spec.bits
        elif k == "sc":
            lo, hi = spec.sub_scale_range
            total += v.size * int(np.ceil(np.log2(hi - lo + 1)))
        elif k == "m":
            lo, hi = spec.sub_min_range
            total += v.size * int(np.ceil(np.log2(hi - lo + 1)))
    return total
