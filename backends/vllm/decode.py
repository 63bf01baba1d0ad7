"""Reference decoder of the two formats (qexport's own, numpy + the bitstream unpacker).

``decode_ct`` / ``decode_gptq`` turn one module's stored tensors back into the IR's neutral
fields: codes uint8 ``[out, in]`` (unsigned, ``0 .. 2**b-1``), scales float32 ``[out, G]`` (the
stored dtype widened exactly) and zeros uint8 ``[out, G]`` (None when the grid is symmetric).
:func:`dequant` is the formats' value ``(u - z) * s`` computed in float32 (exact: ``|u - z|``
< 2**8 times an fp16/bf16 scale fits float32's mantissa) and optionally rounded once to the
model dtype, which is what compressed-tensors and vLLM compute in that dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qexport.errors import VerifyError

from .bitstream import unpack_axis0, unpack_words

__all__ = ["Decoded", "decode_ct", "decode_gptq", "dequant", "ct_layout_of"]


@dataclass
class Decoded:
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    group_size: int


def _need(t: dict[str, torch.Tensor], key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if key not in t:
        raise VerifyError(f"{key}: missing from the checkpoint")
    if dtype is not None and t[key].dtype != dtype:
        raise VerifyError(f"{key}: expected dtype {dtype} (not {t[key].dtype})")
    return t[key]


def _shape(key: str, arr: torch.Tensor | np.ndarray, want: tuple[int, ...]) -> None:
    if tuple(arr.shape) != want:
        raise VerifyError(f"{key}: expected shape {list(want)} (not {list(arr.shape)})")


def ct_layout_of(words_per_row: int, in_f: int, bits: int, prefer: str = "dense") -> str:
    """``dense`` or ``word`` from the stored ``weight_packed`` width (the widths differ for
    ``in >= 32`` at 3/5/6/7 bits); ``prefer`` (from the config's ``version``) breaks a tie."""
    from .bitstream import n_words
    if words_per_row == n_words(in_f, bits, prefer):
        return prefer
    if words_per_row == n_words(in_f, bits, "dense"):
        return "dense"
    if words_per_row == n_words(in_f, bits, "word"):
        return "word"
    raise VerifyError(f"weight_packed: {words_per_row} words per row fit neither the dense "
                      f"({n_words(in_f, bits, 'dense')}) nor the word "
                      f"({n_words(in_f, bits, 'word')}) layout of {in_f} {bits}-bit codes")


def decode_ct(t: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int,
              sym: bool, prefer: str = "dense") -> tuple[Decoded, str]:
    """Decode ``prefix.weight_packed`` etc.; returns the fields and the packing layout."""
    shape = _need(t, f"{prefix}.weight_shape", torch.int64)
    _shape(f"{prefix}.weight_shape", shape, (2,))
    out_f, in_f = (int(v) for v in shape)
    packed = _need(t, f"{prefix}.weight_packed", torch.int32).numpy()
    layout = ct_layout_of(packed.shape[1], in_f, bits, prefer)
    _shape(f"{prefix}.weight_packed", packed, (out_f, packed.shape[1]))
    L = in_f if group_size == -1 else group_size
    G = in_f // L
    scale = _need(t, f"{prefix}.weight_scale")
    _shape(f"{prefix}.weight_scale", scale, (out_f, G))
    zeros = None
    if not sym:
        zp = _need(t, f"{prefix}.weight_zero_point", torch.int32).numpy()
        zeros = unpack_axis0(zp, bits, out_f, layout)
    elif f"{prefix}.weight_zero_point" in t:
        raise VerifyError(f"{prefix}.weight_zero_point: present but the scheme is symmetric")
    codes = unpack_words(packed, bits, in_f, layout)
    return Decoded(codes, scale.float().numpy(), zeros, group_size), layout


def decode_gptq(t: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int,
                sym: bool, out_f: int, in_f: int) -> Decoded:
    """Decode ``prefix.qweight`` etc. (v1: zero = stored + 1); checks ``g_idx`` is trivial and
    that symmetric ``qzeros`` hold ``2**(b-1) - 1``."""
    L = in_f if group_size == -1 else group_size
    G = in_f // L
    qweight = _need(t, f"{prefix}.qweight", torch.int32).numpy()
    _shape(f"{prefix}.qweight", qweight, (in_f * bits // 32, out_f))
    qzeros = _need(t, f"{prefix}.qzeros", torch.int32).numpy()
    _shape(f"{prefix}.qzeros", qzeros, (G, out_f * bits // 32))
    scales = _need(t, f"{prefix}.scales")
    _shape(f"{prefix}.scales", scales, (G, out_f))
    g_idx = _need(t, f"{prefix}.g_idx", torch.int32).numpy()
    if not np.array_equal(g_idx, np.arange(in_f) // L):
        raise VerifyError(f"{prefix}.g_idx: expected i // {L} (desc_act false), not a "
                          "permuted index")
    codes = np.ascontiguousarray(unpack_axis0(qweight, bits, in_f).T)
    z = unpack_words(qzeros, bits, out_f).T.astype(np.int32) + 1       # [out, G]
    if sym:
        if not np.all(z == 2 ** (bits - 1)):
            raise VerifyError(f"{prefix}.qzeros: symmetric grid expects stored "
                              f"{2 ** (bits - 1) - 1} (zero {2 ** (bits - 1)} minus one) "
                              "everywhere")
        zeros = None
    else:
        zeros = z.astype(np.uint8)
    return Decoded(codes, np.ascontiguousarray(scales.float().numpy().T), zeros, group_size)


def dequant(d: Decoded, bits: int, dtype: torch.dtype | None = None) -> np.ndarray:
    """``(u - z) * s`` per column group: float32 ``[out, in]``, rounded to ``dtype`` (and
    widened back) when given."""
    out_f, in_f = d.codes.shape
    L = in_f if d.group_size == -1 else d.group_size
    z = (np.full(d.scales.shape, 2 ** (bits - 1), np.int32) if d.zeros is None
         else d.zeros.astype(np.int32))
    s = np.repeat(d.scales, L, axis=1)
    w = (d.codes.astype(np.int32) - np.repeat(z, L, axis=1)).astype(np.float32) * s
    if dtype is None:
        return w
    return torch.from_numpy(w).to(dtype).float().numpy()
