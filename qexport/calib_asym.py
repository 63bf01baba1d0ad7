"""Asymmetric calibration (GPTAQ's objective, Li et al. 2025): quantize each linear so that the
*quantized* model's input ``x~`` reproduces the *full-precision* layer's output ``W x``.

GPTQ's true-sequential scheme minimises ``sum_t ||(W - Q) x~_t||^2``: it asks the quantized
linear to match the FP weight on the quantized model's inputs, so errors of earlier layers are
neither seen nor corrected. The asymmetric objective ``sum_t ||W x_t - Q x~_t||^2`` compares
against the FP model's own activations ``x`` (a second stream through the unquantized layers).
With ``delta = x - x~``, ``H = 2/N sum x~ x~^T`` and ``P = 2/N sum delta x~^T`` it equals, up
to a constant,

    tr((W' - Q) H (W' - Q)^T),   W' = W + W P H^-1,

so any Hessian-based quantizer (GPTQ, LeanQuant) runs unchanged on the target ``W'`` with the
usual ``H``. ``H`` is damped as the quantizer damps it (``lambda = damp * mean(diag H)``, dead
inputs set to 1), which keeps ``W'`` bounded where ``H`` is ill-conditioned and makes
``W' = W`` exactly when the streams agree (``P = 0``, e.g. the first layer's q/k/v).

GPTAQ folds the same term into GPTQ's column loop; solving for ``W'`` once is equivalent for
the objective and leaves the quantizers untouched.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from qexport.calib import (HessianAccumulator, QuantizeFn, _Activations, _batches,
                           _initial_hidden, _quantize_group, _Stats)
from qexport.errors import NumericsError
from qexport.model.arch import LINEAR_GROUPS, layer_prefix

__all__ = ["CrossAccumulator", "asym_target", "FPStream"]


class CrossAccumulator:
    """``P = 2/N * sum_t w_t (x_t - x~_t) x~_t^T`` (fp32 ``[d, d]``), averaged over sequences
    exactly as :class:`qexport.calib.HessianAccumulator` averages ``H``."""

    def __init__(self, dim: int) -> None:
        self.P = torch.zeros(dim, dim, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor, xq: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """``x``, ``xq``: float32 ``[b, T, d]`` (FP and quantized streams); ``weights``: optional
        per-token weights ``[b, T]``, normalised as HessianAccumulator normalises them."""
        b = x.shape[0]
        delta = x - xq
        if weights is not None:
            s = (weights / weights.mean(-1, keepdim=True).clamp_min(1e-30)).sqrt()[..., None]
            delta, xq = delta * s, xq * s
        total = self.n + b
        self.P.addmm_(delta.reshape(-1, delta.shape[-1]).t().float(),
                      xq.reshape(-1, xq.shape[-1]).float(), beta=self.n / total,
                      alpha=2.0 / total)
        self.n = total


def asym_target(W: torch.Tensor, H: torch.Tensor, P: torch.Tensor, damp: float,
                name: str = "tensor") -> torch.Tensor:
    """``W' = W + W P (H + lambda I)^-1`` (float64 solve, float32 result ``[out, in]``).

    ``W``: float32 ``[out, in]``; ``H``, ``P``: float32 ``[in, in]``; ``damp``: fraction of
    ``mean(diag H)`` added to the diagonal; dead inputs (``H[j, j] == 0``) get 1 there, as GPTQ
    does, and contribute nothing (their ``P`` column is 0).
    """
    H64 = H.double().clone()
    dead = torch.diagonal(H64) == 0
    H64[dead, dead] = 1.0
    H64.diagonal().add_(damp * torch.diagonal(H64).mean())
    L, info = torch.linalg.cholesky_ex(H64)
    if int(info) != 0:
        raise NumericsError(f"{name}: asymmetric calibration: damped Hessian expected positive "
                            f"definite (leading minor {int(info)} is not); raise --damp")
    W64 = W.double()
    X = torch.cholesky_solve(P.double().t() @ W64.t(), L)          # H^-1 P^T W^T: [in, out]
    out = (W64 + X.t()).float()
    if not torch.isfinite(out).all():
        raise NumericsError(f"{name}: asymmetric calibration target has NaN/inf values")
    return out


def _layer(model: Any, i: int) -> Any:
    from qexport.model.forward import DecoderLayer
    return DecoderLayer(model.layer_weights(i), model.arch, i)


class FPStream:
    """The full-precision residual stream beside :func:`qexport.calib.quantize_layerwise`'s
    quantized one: float32 ``[N, T, hidden]`` entering the current layer, in RAM or (``offload``)
    in a temporary file. On resume (``start_layer > 0``) it is rebuilt by running the FP layers
    below ``start_layer`` on the embeddings."""

    def __init__(self, model: Any, samples: torch.Tensor, start_layer: int,
                 rope: tuple[torch.Tensor, torch.Tensor], bs: int, offload: bool,
                 damp: float, cache_bytes: int = 1 << 30) -> None:
        self.model, self.rope, self.bs, self.damp = model, rope, bs, damp
        self.cache_bytes = 0 if offload else cache_bytes
        self.act: _Activations = _initial_hidden(model, samples, 0, None, offload, bs)
        for j in range(start_layer):
            fp = _layer(model, j)
            for sl in _batches(samples.shape[0], bs):
                self.act.h[sl] = fp(self.act.h[sl], rope)
            self.act.release()

    def _target(self, cross: dict[str, CrossAccumulator]
                ) -> Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda name, W, H: asym_target(W, H, cross[name].P, self.damp, name)

    def _pair(self, h: torch.Tensor, fq: Callable, ff: Callable, dim: int, stats: _Stats,
              keep: bool = False) -> tuple[HessianAccumulator, CrossAccumulator, list]:
        """``H`` of ``fq(h)`` and ``P`` of ``(ff(h_fp), fq(h))`` over all batches, plus (``keep``)
        the batches' ``(xq, x)`` when both fit in ``cache_bytes`` (else an empty list)."""
        acc, cross, hf = HessianAccumulator(dim), CrossAccumulator(dim), self.act.h
        keep = keep and 2 * h.shape[0] * h.shape[1] * dim * 4 <= self.cache_bytes
        kept = []
        for sl in _batches(h.shape[0], self.bs):
            t0 = time.perf_counter()
            xq, x = fq(h[sl]), ff(hf[sl])
            t1 = time.perf_counter()
            acc.add(xq)
            cross.add(x, xq)
            stats.forward += t1 - t0
            stats.hessian += time.perf_counter() - t1
            if keep:
                kept.append((xq, x))
        return acc, cross, kept

    def _apply(self, h: torch.Tensor, kept: list, fq: Callable,
               ff: Callable, apply_q: Callable, apply_f: Callable) -> None:
        """``h <- apply_q(h, fq(h))`` and ``h_fp <- apply_f(h_fp, ff(h_fp))`` batch by batch,
        the group inputs taken from ``kept`` when :meth:`_pair` kept them (the group's own
        quantization does not change its input)."""
        hf = self.act.h
        for k, sl in enumerate(_batches(h.shape[0], self.bs)):
            xq, x = kept[k] if kept else (fq(h[sl]), ff(hf[sl]))
            h[sl] = apply_q(h[sl], xq)
            hf[sl] = apply_f(hf[sl], x)
        kept.clear()

    def run_layer(self, layer: Any, h: torch.Tensor, i: int, quantize_fn: QuantizeFn,
                  stats: _Stats, v_hessian: str = "plain") -> None:
        """Quantize layer ``i`` (``layer``, weights replaced group by group) against the FP
        layer; overwrite ``h`` with the quantized layer's output and the FP stream with the FP
        layer's."""
        a, rope = layer.arch, self.rope
        fp = _layer(self.model, i)
        qkv, o, gate_up, down = ([f"{layer_prefix(i)}{m}.weight" for m in g]
                                 for g in LINEAR_GROUPS)
        self._qkv(layer, fp, h, qkv, quantize_fn, stats, v_hessian)
        ctx_q, ctx_f = (lambda x: layer.attn_context(x, rope)), (lambda x: fp.attn_context(x, rope))
        acc, cross, kept = self._pair(h, ctx_q, ctx_f, a.n_heads * a.head_dim, stats, True)
        _quantize_group(layer, o, acc, quantize_fn, stats, target=self._target({o[0]: cross}))
        self._apply(h, kept, ctx_q, ctx_f, layer.attn_residual, fp.attn_residual)
        acc, cross, _ = self._pair(h, layer.mlp_input, fp.mlp_input, a.hidden, stats)
        _quantize_group(layer, gate_up, acc, quantize_fn, stats,
                        target=self._target({n: cross for n in gate_up}))
        acc, cross, kept = self._pair(h, layer.mlp_hidden, fp.mlp_hidden, a.intermediate, stats,
                                      True)
        _quantize_group(layer, down, acc, quantize_fn, stats, target=self._target({down[0]: cross}))
        self._apply(h, kept, layer.mlp_hidden, fp.mlp_hidden, layer.mlp_residual,
                    fp.mlp_residual)

    def _qkv(self, layer: Any, fp: Any, h: torch.Tensor, names: list[str],
             quantize_fn: QuantizeFn, stats: _Stats, v_hessian: str) -> None:
        """q/k/v: plain ``H``/``P``; for ``v_hessian="attention"`` v_proj's are weighted by the
        squared attention each token receives in the quantized stream."""
        if v_hessian != "attention":
            acc, cross, _ = self._pair(h, layer.attn_input, fp.attn_input, layer.arch.hidden,
                                       stats)
            _quantize_group(layer, names, acc, quantize_fn, stats,
                            target=self._target({n: cross for n in names}))
            return
        dim, hf = layer.arch.hidden, self.act.h
        acc, acc_v = HessianAccumulator(dim), HessianAccumulator(dim)
        cross, cross_v = CrossAccumulator(dim), CrossAccumulator(dim)
        for sl in _batches(h.shape[0], self.bs):
            xq, x = layer.attn_input(h[sl]), fp.attn_input(hf[sl])
            w = layer.self_attn.received_attention(xq, self.rope)
            acc.add(xq)
            cross.add(x, xq)
            acc_v.add(xq, w)
            cross_v.add(x, xq, w)
        is_v = {n: ".v_proj." in n for n in names}
        _quantize_group(layer, names, acc, quantize_fn, stats,
                        special={n: acc_v for n in names if is_v[n]},
                        target=self._target({n: cross_v if is_v[n] else cross for n in names}))
