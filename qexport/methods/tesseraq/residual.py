"""LoRC factors of one TesseraQ block, fitted once its codes are final."""
from __future__ import annotations

from typing import Any

import torch

from qexport.grids import round_to_dtype
from qexport.ir import LowRank, QTensor
from qexport.methods.lorc import lorc_factors

from .awq import input_hessians
from .block import full_name, train_step

__all__ = ["fit_block_lorc", "tune_block_lorc"]


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


def tune_block_lorc(i: int, tensors: dict[str, QTensor], final: dict[str, torch.Tensor],
                    layer: Any, h_q: torch.Tensor, y_fp: torch.Tensor, rope: Any, rank: int, *,
                    steps: int, lr: float, batch_size: int, gen: torch.Generator,
                    dtype: str = "fp16") -> list[float]:
    """Rank-``rank`` factors of every exported tensor of block ``i`` trained on the block
    output (``--tq-lorc tune``), the base (codes and tuned scales) fixed.

    The rank-r SVD of each ``W - Q`` moves every linear towards its FP weight on its own, which
    breaks the errors PAR made cancel inside the block (at W2 it raised block 0's loss from 62 to
    161). Here the factors start as a LoRA does (``A = 0``, ``B`` Gaussian / sqrt(in), so the
    start is the plain block) and Adam fits them to the FP block output on the calibration
    windows (``h_q`` / ``y_fp`` float32 ``[n, T, hidden]``; steps of ``batch_size`` sequences
    cut to ``rope``'s length). ``final`` (relative names) becomes base + factors.

    Returns: the mean loss over each tenth of the steps.
    """
    rels = [rel for rel in final if full_name(i, rel) in tensors]
    base = {rel: final[rel].detach() for rel in rels}
    fac = {}
    for rel in rels:
        out_f, in_f = base[rel].shape
        B = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        fac[rel] = (torch.zeros(out_f, rank, requires_grad=True), B.requires_grad_(True))
    opt = torch.optim.Adam([p for ab in fac.values() for p in ab], lr=lr)
    weights = lambda: {rel: base[rel] + fac[rel][0] @ fac[rel][1] for rel in rels}  # noqa: E731
    losses = [train_step(layer, weights, h_q, y_fp, rope, opt, gen, batch_size,
                         f"layer {i}: LoRC tuning") for _ in range(steps)]
    for rel in rels:
        qt = tensors[full_name(i, rel)]
        A, B = (round_to_dtype(p.detach().numpy(), dtype) for p in fac[rel])
        qt.residual = LowRank(A, B, dtype)
        final[rel] = torch.from_numpy(qt.dequantize())
    k = max(1, steps // 10)
    return [sum(losses[j:j + k]) / len(losses[j:j + k]) for j in range(0, steps, k)]
