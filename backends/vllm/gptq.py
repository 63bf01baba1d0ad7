"""GPTQ v1 (AutoGPTQ ``checkpoint_format: gptq``): per-layer tensors and config.

Per quantized linear ``prefix`` (``W [out, in]``, ``G`` groups, ``b`` bits, codes ``u``,
zeros ``z``):

| tensor             | dtype       | shape              | content                                     |
|--------------------|-------------|--------------------|---------------------------------------------|
| ``prefix.qweight`` | int32       | ``[in*b/32, out]`` | dense ``pack(u^T)`` along ``in`` (= CT ``weight_packed^T``) |
| ``prefix.qzeros``  | int32       | ``[G, out*b/32]``  | dense ``pack(z^T - 1)`` along ``out`` (v1: zero minus one) |
| ``prefix.scales``  | model dtype | ``[G, out]``       | scales                                      |
| ``prefix.g_idx``   | int32       | ``[in]``           | ``i // group_size`` (no act-order)           |

Symmetric grids store ``z = 2**(b-1)`` (``qzeros`` words 0x77777777 at 4 bits). A zero point
of 0 cannot be stored (``-1`` borrows into the neighbour field): such tensors are refused.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qexport.errors import LoweringError
from qexport.ir import QTensor

from .bitstream import pack_axis0, pack_words

__all__ = ["gptq_layer_tensors", "gptq_quantization_config", "gptq_zeros"]


def gptq_zeros(qt: QTensor) -> np.ndarray:
    """The true integer zero points ``z`` as uint8 ``[out, G]`` (sym: ``2**(b-1)``)."""
    if qt.grid.zeros is not None:
        return qt.grid.zeros
    return np.full(qt.grid.scales.shape, 2 ** (qt.spec.bits - 1), dtype=np.uint8)


def gptq_layer_tensors(qt: QTensor, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one quantized linear (module name ``prefix``)."""
    bits = qt.spec.bits
    out_f, in_f = qt.shape
    z = gptq_zeros(qt)
    if int(z.min()) < 1:
        r, g = np.argwhere(z < 1)[0]
        raise LoweringError(f"{qt.name}: GPTQ v1 stores zero points minus one, so zero point 0 "
                            f"(row {r}, group {g}) cannot be held; expected zeros in "
                            f"1..{2 ** bits - 1}. Use --format ct (compressed-tensors holds "
                            "0..2**bits-1) or quantize onto the gptq grid (--format gptq)")
    L = qt.spec.group_len(in_f)
    return {
        f"{prefix}.qweight": torch.from_numpy(pack_axis0(np.ascontiguousarray(qt.codes.T), bits)),
        f"{prefix}.qzeros": torch.from_numpy(pack_words(np.ascontiguousarray(z.T - 1), bits)),
        f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(qt.grid.scales.T)).to(dtype),
        f"{prefix}.g_idx": torch.from_numpy(np.arange(in_f, dtype=np.int32) // L),
    }


def gptq_quantization_config(bits: int, group_size: int, sym: bool,
                             skip_modules: list[str]) -> dict[str, Any]:
    """``quantization_config`` (also written as ``quantize_config.json``).

    ``skip_modules``: decoder linears left dense; written as GPTQModel/vLLM ``dynamic``
    ``-:`` (skip) rules so every reader knows they are not quantized.
    """
    cfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
        "sym": sym, "lm_head": False, "true_sequential": True, "damp_percent": 0.01,
        "static_groups": False, "checkpoint_format": "gptq", "format": "gptq",
        "pack_dtype": "int32"}
    if skip_modules:
        cfg["dynamic"] = {"-:^" + m.replace(".", r"\.") + "$": {} for m in sorted(skip_modules)}
    return cfg
