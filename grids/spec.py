"""GridSpec: exactly which weight values a target format can represent, stated as data.

A backend declares one GridSpec per tensor type it writes (``gguf-q4_k``, ``mnb-int4``, ...).
The frontend quantizes *onto* that spec, so lowering is pure packing.

Three kinds of grid share one spec type (fields a kind does not use keep their defaults):

| kind        | decode (fp32, this exact operation order)          | per-group parameters     |
|-------------|----------------------------------------------------|--------------------------|
| affine/none | ``scale * (code - code_offset)``                   | scale                    |
| affine/int  | ``scale * (code - zero)``                          | scale, integer zero      |
| affine/float| ``scale * code + min``                             | scale, float min         |
| superblock  | ``(d * sc) * T(code) - (dmin * m)``                | per super-block d, dmin; |
|             |  T(code) = code - code_offset, or table[code]      | per sub-block sc, m ints |
| codebook    | ``values[row, group, code]`` (free, learned)       | a value table per group  |
|             | ``scale * table[code]`` (fixed table)              | scale                    |

Stored floats (scales, mins, d, dmin, codebook values) are kept as float32 arrays whose values
are exactly representable in ``scale_dtype`` (fp16 by default): the IR never holds a value the
target would round.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GridError

__all__ = [
    "GridKind", "ZeroDomain", "GridSpec", "FLOAT_DTYPES", "round_to_dtype", "check_representable",
]


class GridKind(str, enum.Enum):
    AFFINE = "affine"
    SUPERBLOCK = "superblock"
    CODEBOOK = "codebook"


class ZeroDomain(str, enum.Enum):
    """How the zero point is stored (torchao's ZeroPointDomain; the GPTQ vs k-quant split)."""

    NONE = "none"    # symmetric: a fixed code_offset, nothing stored
    INT = "int"      # integer zero point per group (GPTQ, MatMulNBits, compressed-tensors asym)
    FLOAT = "float"  # float offset per group (Q4_1's m; k-quants' dmin * m)


FLOAT_DTYPES: dict[str, Any] = {"fp16": np.float16, "fp32": np.float32, "bf16": "bf16"}


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to the nearest value of ``dtype`` (RNE), returned as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "fp32":
        return x.copy()
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = rounded.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(x), x, out)
    raise GridError(f"unknown float dtype {dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")


def check_representable(x: np.ndarray, dtype: str, what: str) -> None:
    """Raise GridError unless every value of ``x`` is finite and exactly representable."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise GridError(f"{what}: expected finite values (found {int(np.sum(~np.isfinite(x)))} "
                        "non-finite)")
    back = round_to_dtype(x, dtype)
    bad = back != x
    if np.any(bad):
        i = int(np.flatnonzero(bad.ravel())[0])
        raise GridError(f"{what}: expected values representable in {dtype} "
                        f"(not {float(x.ravel()[i])!r} at flat index {i})")


@dataclass(frozen=True)
class GridSpec:
    """What one target tensor format can represent.

    Attributes:
        name: registry name, e.g. ``"affine"``, ``"gguf-q4_k"``, ``"mnb-int4"``.
        kind: affine, superblock or codebook.
        bits: code width; codes are ``0 .. 2**bits - 1`` stored as uint8.
        group_size: columns (along ``in_features``) sharing one scale; for superblocks the
            sub-block size; ``-1`` means one group per row (per-channel).
        zero: zero-point domain (affine grids; superblocks use FLOAT when ``sub_min_range``).
        code_offset: fixed zero for ZeroDomain.NONE and for superblock codes (Q3_K: 4, Q6_K: 32).
        scale_dtype: dtype of stored scales / mins / d / dmin / codebook values.
        zero_range: inclusive range of integer zero points (ZeroDomain.INT).
        super_size: superblock length (256 for k-quants); 0 for other kinds.
        sub_scale_range: inclusive integer range of superblock sub-scales.
        sub_min_range: inclusive integer range of superblock sub-mins, or None (no mins).
        table: fixed integer codebook (IQ4_NL / IQ4_XS ``kvalues``), or None.
        free_codebook: codebook kind whose values are learned per (row, group).
        row_multiple: ``in_features`` must be a multiple of this (256 for k-quants).
        out_multiple: ``out_features`` must be a multiple of this.
        ragged: whether a shorter last group is allowed when ``group_size`` does not divide
            ``in_features``.
    """

    name: str
    kind: GridKind
    bits: int
    group_size: int
    zero: ZeroDomain = ZeroDomain.NONE
    code_offset: int = 0
    scale_dtype: str = "fp16"
    zero_range: tuple[int, int] | None = None
    super_size: int = 0
    sub_scale_range: tuple[int, int] | None = None
    sub_min_range: tuple[int, int] | None = None
    table: tuple[int, ...] | None = None
    free_codebook: bool = False
    row_multiple: int = 1
    out_multiple: int = 1
    ragged: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise GridError(f"spec {self.name}: bits expected in 1..8 (not {self.bits})")
        if self.group_size == 0 or self.group_size < -1:
            raise GridError(f"spec {self.name}: group_size expected -1 or >= 1 "
                            f"(not {self.group_size})")
        if self.scale_dtype not in FLOAT_DTYPES:
            raise GridError(f"spec {self.name}: scale_dtype expected one of {sorted(FLOAT_DTYPES)}"
                            f" (not {self.scale_dtype!r})")
        if self.kind == GridKind.SUPERBLOCK:
            if self.super_size <= 0 or self.group_size <= 0 or self.super_size % self.group_size:
                raise GridError(f"spec {self.name}: super_size {self.super_size} expected a "
                                f"positive multiple of group_size {self.group_size}")
            if self.sub_scale_range is None:
                raise GridError(f"spec {self.name}: superblock needs sub_scale_range")
        if self.table is not None and len(self.table) != 2 ** self.bits:
            raise GridError(f"spec {self.name}: table expected {2 ** self.bits} entries "
                            f"(not {len(self.table)})")
        if self.zero == ZeroDomain.INT and self.zero_range is None:
            object.__setattr__(self, "zero_range", (0, 2 ** self.bits - 1))

    # ---- derived quantities -------------------------------------------------------------
    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_len(self, in_features: int) -> int:
        """Columns per group for a row of ``in_features`` (per-channel -> the whole row)."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return -(-in_features // g)

    @property
    def param_span(self) -> int:
        """Columns whose parameters are fitted together (a superblock, else a group)."""
        return self.super_size if self.kind == GridKind.SUPERBLOCK else self.group_size

    def check_shape(self, shape: tuple[int, int], tensor: str) -> None:
        """Raise GridError (naming ``tensor``) if a [out, in] weight cannot be held."""
        out_f, in_f = shape
        if in_f % self.row_multiple:
            raise GridError(f"{tensor}: {self.name} needs in_features divisible by "
                            f"{self.row_multiple} (found {in_f})")
        if out_f % self.out_multiple:
            raise GridError(f"{tensor}: {self.name} needs out_features divisible by "
                            f"{self.out_multiple} (found {out_f})")
        if self.group_size > 0 and in_f % self.group_size and not self.ragged:
            raise GridError(f"{tensor}: {self.name} needs in_features divisible by group size "
                            f"{self.group_size} (found {in_f}); choose a group size that "
                            "divides it")
        if self.kind == GridKind.SUPERBLOCK and in_f % self.super_size:
            raise GridError(f"{tensor}: {self.name} needs in_features divisible by "
                            f"{self.super_size} (found {in_f})")

    def is_subset_of(self, target: "GridSpec") -> str | None:
        """None when every (codes, grid) satisfying ``self`` also satisfies ``target`` with
        the same decoded values (shape rules aside: see check_shape); else the first reason."""
        same = ("kind", "bits", "zero", "code_offset", "table", "free_codebook", "super_size")
        for f in same:
            if getattr(self, f) != getattr(target, f):
                return f"{f}: {getattr(self, f)!r} vs {getattr(target, f)!r}"
        if self.group_size != target.group_size:
            return f"group_size: {self.group_size} vs {target.group_size}"
        if self.scale_dtype != target.scale_dtype and target.scale_dtype != "fp32":
            return f"scale_dtype: {self.scale_dtype} vs {target.scale_dtype}"
        for f in ("zero_range", "sub_scale_range", "sub_min_range"):
            a, b = getattr(self, f), getattr(target, f)
            if (a is None) != (b is None) or (a is not None and (a[0] < b[0] or a[1] > b[1])):
                return f"{f}: {a} not within {b}"
        return None

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["zero"] = self.zero.value
        for k in ("zero_range", "sub_scale_range", "sub_min_range", "table"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "spec") -> "GridSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise GridError(f"{where}: unknown keys {sorted(unknown)}; expected a subset of "
                            f"{sorted(fields)}")
        d = dict(d)
        try:
            d["kind"] = GridKind(d["kind"])
            d["zero"] = ZeroDomain(d.get("zero", "none"))
        except (KeyError, ValueError) as e:
            raise GridError(f"{where}: bad kind/zero: {e}") from e
        for k in ("zero_range", "sub_scale_range", "sub_min_range", "table"):
            if d.get(k) is not None:
                d[k] = tuple(int(v) for v in d[k])
        return cls(**d)

    # ---- convenience constructors ------------------------------------------------------
    @classmethod
    def affine(cls, bits: int, group_size: int, sym: bool, *, zero: ZeroDomain | None = None,
               scale_dtype: str = "fp16", name: str | None = None, **kw: Any) -> "GridSpec":
        """Plain integer affine grid (GPTQ-style): sym -> fixed zero 2**(bits-1), else INT zero."""
        z = zero if zero is not None else (ZeroDomain.NONE if sym else ZeroDomain.INT)
        off = 2 ** (bits - 1) if z == ZeroDomain.NONE else 0
        nm = name or f"affine-w{bits}g{group_size}{'s' if z == ZeroDomain.NONE else 'a'}"
        return cls(name=nm, kind=GridKind.AFFINE, bits=bits, group_size=group_size, zero=z,
                   code_offset=off, scale_dtype=scale_dtype, **kw)
