"""The GGUF tensor types qexport writes, as data: one row per type, with its exact GridSpec.

| type   | id | block | bytes | grid kind  | decode (see ``qexport.grids.spec``)        | params        |
|--------|----|-------|-------|------------|--------------------------------------------|---------------|
| Q4_0   | 2  | 32    | 18    | affine     | ``d * (q - 8)``                            | fp16 d        |
| Q4_1   | 3  | 32    | 20    | affine     | ``d * q + m``                              | fp16 d, m     |
| Q5_0   | 6  | 32    | 22    | affine     | ``d * (q - 16)``                           | fp16 d        |
| Q5_1   | 7  | 32    | 24    | affine     | ``d * q + m``                              | fp16 d, m     |
| Q8_0   | 8  | 32    | 34    | affine     | ``d * (q - 128)`` (stored int8 ``q-128``)  | fp16 d        |
| Q2_K   | 10 | 256   | 84    | superblock | ``(d*sc) * q - (dmin*m)``, 16 x 16         | sc, m 0..15   |
| Q3_K   | 11 | 256   | 110   | superblock | ``(d*sc) * (q - 4)``, 16 x 16              | sc -32..31    |
| Q4_K   | 12 | 256   | 144   | superblock | ``(d*sc) * q - (dmin*m)``, 8 x 32          | sc, m 0..63   |
| Q5_K   | 13 | 256   | 176   | superblock | ``(d*sc) * q - (dmin*m)``, 8 x 32          | sc, m 0..63   |
| Q6_K   | 14 | 256   | 210   | superblock | ``(d*sc) * (q - 32)``, 16 x 16             | sc -128..127  |
| IQ4_NL | 20 | 32    | 18    | codebook   | ``d * kvalues[q]``                         | fp16 d        |
| IQ4_XS | 23 | 256   | 136   | superblock | ``(d*sc) * kvalues[q]``, 8 x 32            | sc -32..31    |

Blocks run along ``in_features`` (ggml ``ne[0]``), so a row must hold a whole number of blocks:
``in % 32 == 0`` for the 32-element types, ``in % 256 == 0`` for k-quants and IQ4_XS (no ragged
last block). Every stored float is fp16; d and dmin may be negative or zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qexport.errors import UnsupportedError
from qexport.grids import GridKind, GridSpec, ZeroDomain

__all__ = ["GGUFType", "GGUF_TYPES", "KVALUES_IQ4NL", "QK_K", "gguf_type", "spec_for",
           "type_for_spec", "type_names"]

QK_K = 256
# llama.cpp kvalues_iq4nl (ggml-common.h), sorted ascending: the fixed IQ4_NL / IQ4_XS table.
KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10,
                                  1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGUFType:
    """One GGUF block type.

    Attributes:
        name: llama.cpp's upper-case name (``"Q4_K"``).
        ggml_type: the ``gguf.GGMLQuantizationType`` member.
        block_size: elements per block along a row.
        type_size: bytes per block (gguf's ``GGML_QUANT_SIZES``).
        spec: the GridSpec an IR tensor must satisfy to be stored as this type.
    """

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int
    type_size: int
    spec: GridSpec

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one packed row of ``in_features`` elements (must be a block multiple)."""
        if in_features % self.block_size:
            raise UnsupportedError(f"{self.name}: row length expected a multiple of "
                                   f"{self.block_size} (not {in_features})")
        return in_features // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


def _legacy(name: str, bits: int, zero: ZeroDomain, offset: int = 0) -> GridSpec:
    return GridSpec(name=f"gguf-{name.lower()}", kind=GridKind.AFFINE, bits=bits, group_size=32,
                    zero=zero, code_offset=offset, scale_dtype="fp16", row_multiple=32,
                    ragged=False)


def _kquant(name: str, bits: int, group: int, sc: tuple[int, int],
            mins: tuple[int, int] | None = None, offset: int = 0,
            table: tuple[int, ...] | None = None) -> GridSpec:
    return GridSpec(name=f"gguf-{name.lower()}", kind=GridKind.SUPERBLOCK, bits=bits,
                    group_size=group, zero=ZeroDomain.FLOAT if mins else ZeroDomain.NONE,
                    code_offset=offset, scale_dtype="fp16", super_size=QK_K, sub_scale_range=sc,
                    sub_min_range=mins, table=table, row_multiple=QK_K, ragged=False)


_SPECS: dict[str, GridSpec] = {
    "Q4_0": _legacy("Q4_0", 4, ZeroDomain.NONE, 8),
    "Q4_1": _legacy("Q4_1", 4, ZeroDomain.FLOAT),
    "Q5_0": _legacy("Q5_0", 5, ZeroDomain.NONE, 16),
    "Q5_1": _legacy("Q5_1", 5, ZeroDomain.FLOAT),
    "Q8_0": _legacy("Q8_0", 8, ZeroDomain.NONE, 128),
    "Q2_K": _kquant("Q2_K", 2, 16, (0, 15), (0, 15)),
    "Q3_K": _kquant("Q3_K", 3, 16, (-32, 31), offset=4),
    "Q4_K": _kquant("Q4_K", 4, 32, (0, 63), (0, 63)),
    "Q5_K": _kquant("Q5_K", 5, 32, (0, 63), (0, 63)),
    "Q6_K": _kquant("Q6_K", 6, 16, (-128, 127), offset=32),
    "IQ4_NL": GridSpec(name="gguf-iq4_nl", kind=GridKind.CODEBOOK, bits=4, group_size=32,
                       scale_dtype="fp16", table=KVALUES_IQ4NL, row_multiple=32, ragged=False),
    "IQ4_XS": _kquant("IQ4_XS", 4, 32, (-32, 31), table=KVALUES_IQ4NL),
}


def _row(name: str) -> GGUFType:
    t = GGMLQuantizationType[name]
    block, size = GGML_QUANT_SIZES[t]
    return GGUFType(name=name, ggml_type=t, block_size=block, type_size=size, spec=_SPECS[name])


GGUF_TYPES: dict[str, GGUFType] = {n: _row(n) for n in _SPECS}
_BY_SPEC_NAME = {t.spec.name: t for t in GGUF_TYPES.values()}


def type_names() -> list[str]:
    return list(GGUF_TYPES)


def gguf_type(name: str | GGMLQuantizationType) -> GGUFType:
    """The row for ``name`` (``"Q4_K"``, ``"q4_k"``, or a GGMLQuantizationType)."""
    key = name.name if isinstance(name, gguf.GGMLQuantizationType) else str(name).upper()
    row = GGUF_TYPES.get(key)
    if row is None:
        raise UnsupportedError(f"GGUF type {name!r} is not supported; expected one of "
                               f"{', '.join(GGUF_TYPES)}")
    return row


def spec_for(name: str | GGMLQuantizationType) -> GridSpec:
    """The GridSpec of a GGUF type (``spec_for("Q4_K").name == "gguf-q4_k"``)."""
    return gguf_type(name).spec


def type_for_spec(spec: GridSpec) -> GGUFType:
    """The GGUF type whose grid is exactly ``spec`` (raises UnsupportedError otherwise)."""
    row = _BY_SPEC_NAME.get(spec.name)
    if row is None:
        raise UnsupportedError(f"grid spec {spec.name!r} has no GGUF type; expected one of "
                               f"{', '.join(sorted(_BY_SPEC_NAME))}")
    if row.spec != spec:
        raise UnsupportedError(f"grid spec {spec.name!r} differs from GGUF {row.name}'s grid "
                               f"(expected {row.spec.to_dict()}, not {spec.to_dict()})")
    return row
