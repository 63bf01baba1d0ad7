"""LoRC factors of one TesseraQ block, fitted once its codes are final."""
from __future__ import annotations

from typing import Any

import torch

from qexport.ir import QTensor
from qexport.methods.lorc import lorc_factors

from .awq import input_hessians
from .block import full_name

__all__ = ["fit_block_lorc"]


def fit_block_lorc(i: int, tensors: dict[str, QTensor], final: dict[str, torch.Tensor],
                   ref: dict[str, torch.Tensor], layer_q: Any, h_q: torch.Tensor, rope: Any,
                   lorc: tuple[int, str], *, chain: bool, bs: int = 8) -> None:
    """Set ``qt.residual`` of every QTensor of block ``i``.

    Args:
        tensors: the block's exported QTensors by HF name (changed in place).
        final: the block's weights by relative name (``self_attn.q_proj.weight``), float32;
            with ``chain`` each quantized linear's becomes base + factors.
        ref: the FP reference by relative name: the AWQ-folded weights before clipping.
        layer_q: the block with its exported (base) weights; h_q: float32 ``[n, T, hidden]``
            its quantized-chain inputs, for the "hessian" weighting.
        lorc: ``(rank, weighting)``, weighting one of :data:`qexport.methods.lorc.LORC_WEIGHTS`.
    """
    rank, weight = lorc
    hess = input_hessians(layer_q, h_q, rope, bs) if weight == "hessian" else {}
    for rel in final:
        name = full_name(i, rel)
        if name not in tensors:
            continue
        qt = tensors[name]
        H = hess[rel[:-len(".weight")]].numpy() if hess else None
        qt.residual = lorc_factors(ref[rel].numpy(), qt.dequantize(with_residual=False), rank,
                                   H=H)
        if chain:
            final[rel] = torch.from_numpy(qt.dequantize())
