"""GPTQ against an independent, literal re-implementation of IST-DASLab ``fasterquant``.

The reference below is plain torch written from the algorithm (algorithms.md §1): quant.py's
min-max quantizer (``zero = round(-xmin/scale)``; symmetric ``zero = (maxq+1)/2``), dead
columns, static groups, act-order, damp ``percdamp * mean(diag H)``, cholesky ->
cholesky_inverse -> cholesky(upper), lazy block updates. It shares no code with qexport.
With ``fp16=True`` it rounds each scale to fp16 *before* computing the zero point, which is
what a target with fp16 scales stores (qexport.grids does the same); with ``fp16=False`` it is
IST-DASLab unchanged and qexport uses ``scale_dtype="fp32"``.

Tolerance: none. Both sides run the same IEEE fp32 operations in the same order (division,
round-half-even, the same torch rank-1 and block updates), so dequantized weights must be
equal bit for bit. A single differing code would mean a different algorithm.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.grids import GridSpec, validate
from qexport.methods import gptq_quantize


# ---- the reference -------------------------------------------------------------------------
def ref_find_params(x: torch.Tensor, bits: int, sym: bool, fp16: bool):
    maxq = 2 ** bits - 1
    z = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1).values, z)
    xmax = torch.maximum(x.max(1).values, z)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both, torch.tensor(-1.0), xmin)
    xmax = torch.where(both, torch.tensor(1.0), xmax)
    scale = (xmax - xmin) / maxq
    if fp16:
        scale = scale.half().float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def ref_quantize(x: torch.Tensor, scale, zero, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def ref_gptq(W, H, *, bits, sym, groupsize, fp16, blocksize=128, percdamp=0.01,
             actorder=False, static_groups=False) -> torch.Tensor:
    W, H = W.clone().float(), H.clone().float()
    cols, maxq = W.shape[1], 2 ** bits - 1
    params = ref_find_params(W, bits, sym, fp16)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [ref_find_params(W[:, i:i + groupsize], bits, sym, fp16)
                  for i in range(0, cols, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols)
    H[idx, idx] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        params = ref_find_params(W[:, i1 + i:i1 + i + groupsize], bits, sym,
                                                 fp16)
                else:
                    j = int(perm[i1 + i]) if actorder else i1 + i
                    params = groups[j // groupsize]
            q = ref_quantize(w.unsqueeze(1), params[0].unsqueeze(1), params[1].unsqueeze(1),
                             maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, invperm] if actorder else Q


# ---- fixtures ------------------------------------------------------------------------------
def _layer(rng: np.random.Generator, out_f: int, in_f: int):
    W = torch.from_numpy((rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32))
    mix = rng.standard_normal((in_f, in_f)) * 0.3 + np.eye(in_f)
    scales = np.exp(rng.standard_normal(in_f))             # uneven diag(H) for act-order
    X = (rng.standard_normal((4 * in_f, in_f)) @ mix) * scales
    H = torch.from_numpy((2.0 / X.shape[0] * X.T @ X).astype(np.float32))
    return W, H


CASES = [  # bits, sym, group, fp16, blocksize, actorder, static, group_fit, ref blocksize
    (4, True, -1, True, 128, False, False, "updated", 128),
    (3, False, -1, False, 128, False, False, "updated", 128),
    (4, True, 128, True, 128, False, False, "updated", 128),      # ragged last group (64)
    (4, False, 128, True, 64, False, False, "updated", 64),       # group spans two blocks
    (3, False, 32, False, 128, False, False, "ist", 128),         # IST's mid-block group fit
    (4, True, 32, True, 128, False, False, "ist", 128),
    (4, False, 32, True, 1, False, False, "updated", 1),
    (4, False, 32, True, 128, False, True, "updated", 128),       # static groups
    (4, True, -1, True, 128, True, False, "updated", 128),        # act-order, per-channel
    (4, False, 64, True, 128, True, True, "updated", 128),        # act-order + static groups
    (2, False, 64, False, 32, True, True, "ist", 32),
    (8, True, 128, True, 128, True, True, "updated", 128),
]


@pytest.mark.parametrize("bits,sym,group,fp16,bs,act,static,fit,ref_bs", CASES)
def test_gptq_equals_reference(rng, bits, sym, group, fp16, bs, act, static, fit, ref_bs):
    W, H = _layer(rng, 48, 192)
    spec = GridSpec.affine(bits, group, sym, scale_dtype="fp16" if fp16 else "fp32")
    res = gptq_quantize(W, H, spec, name="t", blocksize=bs, actorder=act, static_groups=static,
                        group_fit=fit)
    ref = ref_gptq(W, H, bits=bits, sym=sym, groupsize=group, fp16=fp16, blocksize=ref_bs,
                   actorder=act, static_groups=static).numpy()
    validate(res.codes, res.grid, spec, "t")
    deq = res.dequantize()
    diff = np.flatnonzero(deq != ref)
    assert diff.size == 0, (f"{diff.size} of {deq.size} weights differ; first at flat "
                            f"{diff[:5]}: ours {deq.ravel()[diff[:5]]} ref {ref.ravel()[diff[:5]]}")


@pytest.mark.parametrize("group", [32, 96])
def test_updated_fit_is_blocksize_independent_and_ist_is_not(rng, group):
    """Dynamic groups starting inside blocks of 128 (32: inside; 96: spans cross block ends,
    so their tail needs the block's pending update): "updated" fits on the true current
    weights, so blocksize only changes fp32 round-off (a handful of codes flip at exact ties
    at most); "ist" fits on stale weights mid-block, which changes many grids."""
    W, H = _layer(rng, 48, 256)
    spec = GridSpec.affine(3, group, False)
    one = gptq_quantize(W, H, spec, blocksize=1).dequantize()
    ref = ref_gptq(W, H, bits=3, sym=False, groupsize=group, fp16=True, blocksize=1).numpy()
    assert np.array_equal(one, ref)
    upd = gptq_quantize(W, H, spec, blocksize=128, group_fit="updated").dequantize()
    ist = gptq_quantize(W, H, spec, blocksize=128, group_fit="ist").dequantize()
    assert np.mean(upd != one) < 1e-3
    assert np.mean(ist != one) > 1e-2


def test_actorder_groups_forces_static_and_reports_it(rng):
    W, H = _layer(rng, 16, 128)
    spec = GridSpec.affine(4, 32, True)
    res = gptq_quantize(W, H, spec, actorder=True)
    assert res.stats["static_groups"] is True
    assert "act-order" in res.stats["static_groups_reason"]
    ref = ref_gptq(W, H, bits=4, sym=True, groupsize=32, fp16=True, actorder=True,
                   static_groups=True).numpy()
    assert np.array_equal(res.dequantize(), ref)
    plain = gptq_quantize(W, H, spec)
    assert plain.stats["static_groups"] is False and "static_groups_reason" not in plain.stats
