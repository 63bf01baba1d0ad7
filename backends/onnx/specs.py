"""The ``com.microsoft::MatMulNBits`` weight contract as data, and its GridSpecs.

MatMulNBits computes ``Y = A @ dequant(B)^T`` with, for output row ``n`` and input column ``k``::

    dequant(B)[n, k] = (q[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]

| item            | layout / rule                                                              |
|-----------------|----------------------------------------------------------------------------|
| ``B``           | uint8 ``[N, k_blocks, block_size * bits / 8]``, K padded to whole blocks     |
| code order      | little end first in each byte: 4-bit byte j = ``q[2j] | q[2j+1] << 4``      |
| ``scales``      | model dtype (fp32 graph: float, fp16 graph: float16) ``[N, k_blocks]``       |
| ``zero_points`` | packed uint8 ``[N, ceil(k_blocks * bits / 8)]``, same bit order along blocks |
| no zero_points  | implicit zero ``2 ** (bits - 1)`` (8 for 4-bit): the symmetric grid          |
| ``g_idx``       | never emitted (onnxruntime's CPU kernel ignores uint8 zero points with it)   |

The IR's affine grids map onto this exactly: ``AffineGrid`` with ``ZeroDomain.NONE`` and
``code_offset = 2 ** (bits - 1)`` is the no-zero-points form, ``ZeroDomain.INT`` the packed
zero-points form. fp16-representable scales are exactly representable in an fp32 graph too, so
one ``mnb-*`` spec (scale_dtype fp16) lowers exactly into both graph variants.
"""
from __future__ import annotations

from dataclasses import dataclass

from qexport.errors import LoweringError, UnsupportedError
from qexport.grids import GridKind, GridSpec, ZeroDomain

__all__ = ["MNB_BITS", "MNB_BLOCK_SIZES", "MNB_MIN_ORT", "MnbFormat", "mnb_spec", "mnb_name",
           "mnb_format_of", "supported_combinations_text"]

#: bit widths in the MatMulNBits schema ("supported values: 2, 4, 8")
MNB_BITS: tuple[int, ...] = (2, 4, 8)
#: block sizes every onnxruntime CPU kernel from 1.20 to 1.32 computes correctly
MNB_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
#: oldest onnxruntime whose CPU EP runs each width with uint8 zero points at accuracy_level 0
MNB_MIN_ORT: dict[int, str] = {4: "1.20", 8: "1.23", 2: "1.24"}


@dataclass(frozen=True)
class MnbFormat:
    """How one QTensor is held by MatMulNBits: ``bits``, ``block_size``, symmetric or not."""

    bits: int
    block_size: int
    sym: bool

    @property
    def implicit_zero(self) -> int:
        """The zero point onnxruntime uses when the zero_points input is absent."""
        return 2 ** (self.bits - 1)

    @property
    def blob_size(self) -> int:
        """Bytes per block of ``block_size`` codes."""
        return self.block_size * self.bits // 8


def supported_combinations_text() -> str:
    """One line naming every combination this backend writes."""
    return (f"bits in {list(MNB_BITS)}, block_size in {list(MNB_BLOCK_SIZES)}, symmetric "
            "(implicit zero 2**(bits-1)) or asymmetric (uint8 zero points)")


def _check_combo(bits: int, block_size: int, what: str) -> None:
    if bits not in MNB_BITS or block_size not in MNB_BLOCK_SIZES:
        raise UnsupportedError(f"{what}: MatMulNBits cannot hold bits={bits}, "
                               f"block_size={block_size}; expected {supported_combinations_text()}")


def mnb_name(bits: int, block_size: int, sym: bool) -> str:
    """Registry name, e.g. ``mnb-int4-b32-sym``."""
    return f"mnb-int{bits}-b{block_size}-{'sym' if sym else 'asym'}"


def mnb_spec(bits: int, block_size: int, sym: bool, scale_dtype: str = "fp16") -> GridSpec:
    """The GridSpec of MatMulNBits weights with ``bits`` / ``block_size`` / (a)symmetric zeros.

    Ragged last groups are allowed (the packer pads K to whole blocks with zero-valued codes).
    Raises UnsupportedError naming the supported combinations for anything else.
    """
    _check_combo(bits, block_size, mnb_name(bits, block_size, sym))
    if scale_dtype not in ("fp16", "fp32"):
        raise UnsupportedError(f"{mnb_name(bits, block_size, sym)}: scale_dtype expected fp16 or "
                               f"fp32 (not {scale_dtype!r}); MatMulNBits scales have the graph's "
                               "dtype")
    return GridSpec.affine(bits, block_size, sym, scale_dtype=scale_dtype,
                           name=mnb_name(bits, block_size, sym), ragged=True)


def mnb_format_of(spec: GridSpec, tensor: str) -> MnbFormat:
    """Map a QTensor's spec onto MatMulNBits, or raise (naming ``tensor``) why it cannot.

    Any spec whose values are a subset of an ``mnb-*`` spec is accepted (e.g. a GPTQ-style
    ``affine-w4g128a`` spec); the scale dtype is checked against the graph dtype at packing.
    """
    if spec.kind != GridKind.AFFINE or spec.zero == ZeroDomain.FLOAT:
        kind = spec.kind.value + ("/float-min" if spec.kind == GridKind.AFFINE else "")
        raise UnsupportedError(
            f"{tensor}: spec {spec.name} is a {kind} grid; MatMulNBits holds only integer affine "
            "grids (symmetric or with integer zero points). Quantize onto mnb_spec(...) instead, "
            "or keep this tensor unquantized")
    sym = spec.zero == ZeroDomain.NONE
    _check_combo(spec.bits, spec.group_size, f"{tensor} (spec {spec.name})")
    target = mnb_spec(spec.bits, spec.group_size, sym, scale_dtype="fp32")
    why = spec.is_subset_of(target)
    if why is not None:
        raise LoweringError(f"{tensor}: spec {spec.name} does not fit {target.name}: {why}")
    return MnbFormat(bits=spec.bits, block_size=spec.group_size, sym=sym)
