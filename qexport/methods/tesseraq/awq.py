"""AWQ initialisation for one decoder block: activation-aware scale search, folding, auto-clip.

Scale search (llm-awq ``auto_scale`` / llmc ``trans_version v2``), per pair below: ``m`` = mean
``|x|`` of the pair's input per input channel; for ``ratio = k / n_grid`` (k = 0..n_grid-1)
``s = clamp(m ** ratio, 1e-4)``, ``s /= sqrt(max(s) * min(s))``; each scaled linear becomes
``Q(W * s) / s`` (Q = round-to-nearest on the tensor's *target* GridSpec) and the pair's module
output is compared with the FP output (MSE over all elements). The best ratio wins (ratio 0 is
``s = 1``, plain RTN). All searches run on the unmodified block, then every scale is folded:

| pair    | previous op (divided by s)         | scaled linears (columns x s) | compared output   |
|---------|------------------------------------|------------------------------|-------------------|
| qkv     | input_layernorm weight             | q, k, v                      | attention (o_proj)|
| vo      | v_proj rows (and bias)             | o_proj                       | o_proj            |
| gate_up | post_attention_layernorm weight    | gate, up                     | MLP (down_proj)   |
| down    | up_proj rows                       | down_proj                    | down_proj         |

With grouped-query attention the v->o scale is tied across the query heads that share a KV head
(o column ``h * head_dim + j`` gets ``s_v[(h // rep) * head_dim + j]``, ``m`` averaged over those
heads), so the fold stays exact. A pair is skipped when one of the linears it changes is not
being quantized (it would change an FP passthrough weight).

Auto-clip (llm-awq ``auto_clip``, n_grid 20, max_shrink 0.5, q/k skipped): per group, the
largest ``|w|`` shrunk by ``1 - i / n_grid`` (i < max_shrink * n_grid) clamps the weights
symmetrically; the shrink minimising the mean over tokens of ``(x_g . (Q(W_c) - W)_g)^2`` on the
target grid wins (superblock specs: groups are the sub-blocks, quantized together per superblock).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from qexport.grids import GridSpec
from qexport.methods.rtn import rtn_quantize

from .block import swapped

__all__ = ["AwqConfig", "SCALE_PAIRS", "CLIP_SKIP", "awq_block", "fold_scales", "fake_quant",
           "scale_candidates", "clip_weight", "input_importance"]

SCALE_PAIRS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("vo", "self_attn.v_proj", ("self_attn.o_proj",)),
    ("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", "mlp.up_proj", ("mlp.down_proj",)),
)
CLIP_SKIP: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass
class AwqConfig:
    """AWQ hyper-parameters (llm-awq defaults)."""

    scale: bool = True
    vo: bool = True
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512


def fake_quant(W: torch.Tensor, spec: GridSpec, name: str = "tensor") -> torch.Tensor:
    """RTN of ``W`` (float32 ``[out, in]``) on ``spec``, dequantized (float32 tensor)."""
    return torch.from_numpy(rtn_quantize(W.numpy(), spec, name=name).dequantize())


def scale_candidates(x_mean: torch.Tensor, n_grid: int) -> list[torch.Tensor]:
    """The ``n_grid`` normalised scale vectors ``m ** (k / n_grid)`` (float32 ``[in]``)."""
    out = []
    for k in range(n_grid):
        s = x_mean.pow(k / n_grid).clamp(min=1e-4)
        out.append(s / torch.sqrt(s.max() * s.min()))
    return out


def _tie_gqa(m: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Per o-input-channel statistic ``[n_heads*hd]`` -> per v-output-channel ``[n_kv*hd]``."""
    return m.view(n_kv, n_heads // n_kv, head_dim).mean(1).reshape(-1)


def _expand_gqa(s_kv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """v-channel scales ``[n_kv*hd]`` -> o-input-channel scales ``[n_heads*hd]``."""
    return s_kv.view(n_kv, 1, head_dim).expand(n_kv, n_heads // n_kv, head_dim).reshape(-1)


def fold_scales(weights: dict[str, torch.Tensor], pair: str, s_prev: torch.Tensor,
                s_cols: torch.Tensor) -> None:
    """In place: divide the previous op's output channels by ``s_prev`` and multiply the pair's
    linears' input columns by ``s_cols`` (equal except for GQA v->o)."""
    _, prev, linears = next(p for p in SCALE_PAIRS if p[0] == pair)
    if prev.endswith("layernorm"):
        weights[f"{prev}.weight"] = weights[f"{prev}.weight"] / s_prev
    else:
        weights[f"{prev}.weight"] = weights[f"{prev}.weight"] / s_prev[:, None]
        if f"{prev}.bias" in weights:
            weights[f"{prev}.bias"] = weights[f"{prev}.bias"] / s_prev
    for lin in linears:
        weights[f"{lin}.weight"] = weights[f"{lin}.weight"] * s_cols[None, :]


class _Captured:
    """Inputs of each pair and the module functions that produce the compared outputs."""

    def __init__(self, layer: Any, h: torch.Tensor, rope: Any) -> None:
        with torch.no_grad():
            self.layer, self.rope = layer, rope
            self.x_attn = layer.attn_input(h)
            self.x_o = layer.self_attn.context(self.x_attn, rope)
            h2 = layer.attn_residual(h, self.x_o)
            self.x_mlp = layer.mlp_input(h2)
            self.x_down = layer.mlp.hidden(self.x_mlp)

    def pair(self, pair: str) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        at, mlp = self.layer.self_attn, self.layer.mlp
        if pair == "qkv":
            return self.x_attn, lambda: at.o_proj(at.context(self.x_attn, self.rope))
        if pair == "vo":
            return self.x_o, lambda: at.o_proj(self.x_o)
        if pair == "gate_up":
            return self.x_mlp, lambda: mlp.down_proj(mlp.hidden(self.x_mlp))
        return self.x_down, lambda: mlp.down_proj(self.x_down)


def _search(cap: _Captured, pair: str, weights: dict[str, torch.Tensor],
            specs: dict[str, GridSpec], cfg: AwqConfig, gqa: tuple[int, int, int] | None
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Best ``(s_prev, s_cols, report)`` for one pair."""
    _, _, linears = next(p for p in SCALE_PAIRS if p[0] == pair)
    x, out_fn = cap.pair(pair)
    with torch.no_grad():
        ref = out_fn()
        m = x.abs().reshape(-1, x.shape[-1]).mean(0)
        if gqa is not None:
            m = _tie_gqa(m, *gqa)
        best = (math.inf, 0, None)
        losses = []
        for k, s in enumerate(scale_candidates(m, cfg.n_grid)):
            cols = _expand_gqa(s, *gqa) if gqa is not None else s
            new = {f"{lin}.weight": fake_quant(weights[f"{lin}.weight"] * cols[None, :],
                                               specs[lin], lin) / cols[None, :]
                   for lin in linears}
            with swapped(cap.layer, new):
                loss = float((ref - out_fn()).pow(2).mean())
            losses.append(loss)
            if loss < best[0]:
                best = (loss, k, s)
    s = best[2]
    cols = _expand_gqa(s, *gqa) if gqa is not None else s
    return s, cols, {"ratio": best[1] / cfg.n_grid, "loss": best[0], "loss_ratio0": losses[0]}


def clip_weight(W: torch.Tensor, x: torch.Tensor, spec: GridSpec, cfg: AwqConfig,
                name: str = "tensor") -> tuple[torch.Tensor, float]:
    """Auto-clip ``W`` (float32 ``[out, in]``) for inputs ``x [tokens, in]`` on ``spec``.

    Returns the clipped weight and the mean chosen shrink fraction."""
    out_f, in_f = W.shape
    gl = spec.group_len(in_f)
    ng = -(-in_f // gl)
    pad = ng * gl - in_f
    Wp = torch.nn.functional.pad(W, (0, pad)).view(out_f, ng, gl)
    xg = torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], ng, gl)
    amax = Wp.abs().amax(-1)                                   # [out, ng]
    best_err = torch.full_like(amax, math.inf)
    best_mx = amax.clone()
    best_i = torch.zeros_like(amax)
    with torch.no_grad():
        for i in range(int(cfg.max_shrink * cfg.clip_grid)):
            mx = amax * (1 - i / cfg.clip_grid)
            Wc = torch.maximum(torch.minimum(Wp, mx[..., None]), -mx[..., None])
            Wq = fake_quant(Wc.reshape(out_f, ng * gl)[:, :in_f].contiguous(), spec, name)
            E = torch.nn.functional.pad(Wq - W, (0, pad)).view(out_f, ng, gl)
            err = torch.einsum("tgc,ogc->otg", xg, E).pow(2).mean(1)   # [out, ng]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_mx = torch.where(better, mx, best_mx)
            best_i = torch.where(better, torch.full_like(best_i, i / cfg.clip_grid), best_i)
    Wc = torch.maximum(torch.minimum(Wp, best_mx[..., None]), -best_mx[..., None])
    return Wc.reshape(out_f, ng * gl)[:, :in_f].contiguous(), float(best_i.mean())


def input_importance(layer: Any, h: torch.Tensor, rope: Any) -> dict[str, np.ndarray]:
    """Mean squared input of every column of each linear (llama.cpp's imatrix statistic).

    Args: layer: a DecoderLayer; h: float32 ``[n, T, hidden]`` block inputs.
    Returns: ``{relative module name: float32 [in_features]}``.
    """
    cap = _Captured(layer, h, rope)
    xs = {"self_attn.q_proj": cap.x_attn, "self_attn.k_proj": cap.x_attn,
          "self_attn.v_proj": cap.x_attn, "self_attn.o_proj": cap.x_o,
          "mlp.gate_proj": cap.x_mlp, "mlp.up_proj": cap.x_mlp, "mlp.down_proj": cap.x_down}
    out: dict[str, np.ndarray] = {}
    for k, x in xs.items():
        out[k] = x.reshape(-1, x.shape[-1]).pow(2).mean(0).numpy().astype(np.float32)
    return out


def input_hessians(layer: Any, h: torch.Tensor, rope: Any, bs: int = 8
                   ) -> dict[str, torch.Tensor]:
    """GPTQ's Hessian ``2/N sum x x^T`` of every linear's input (N tokens), in batches of ``bs``
    sequences of ``h`` (float32 ``[n, T, hidden]`` block inputs).

    Returns: ``{relative module name: float32 [in_features, in_features]}``.
    """
    acc: dict[str, torch.Tensor] = {}
    for s in range(0, h.shape[0], bs):
        cap = _Captured(layer, h[s:s + bs], rope)
        for key, x in (("attn", cap.x_attn), ("o", cap.x_o), ("mlp", cap.x_mlp),
                       ("down", cap.x_down)):
            x = x.reshape(-1, x.shape[-1])
            xx = (x.T @ x).double()               # fp32 per batch, summed in fp64
            acc[key] = acc[key] + xx if key in acc else xx
    n = h.shape[0] * h.shape[1]
    H = {k: (2.0 / n * v).float() for k, v in acc.items()}
    return {"self_attn.q_proj": H["attn"], "self_attn.k_proj": H["attn"],
            "self_attn.v_proj": H["attn"], "self_attn.o_proj": H["o"],
            "mlp.gate_proj": H["mlp"], "mlp.up_proj": H["mlp"], "mlp.down_proj": H["down"]}


def _token_subset(x: torch.Tensor, n: int) -> torch.Tensor:
    """Evenly strided ``n`` rows of ``x`` flattened to ``[tokens, d]`` (llm-awq's ``::step``)."""
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, flat.shape[0] // n)
    return flat[::step][:n].contiguous()


def awq_block(layer_factory: Callable[[dict[str, torch.Tensor]], Any],
              weights: dict[str, torch.Tensor], specs: dict[str, GridSpec], h: torch.Tensor,
              rope: Any, arch: Any, cfg: AwqConfig,
              folded_out: dict[str, torch.Tensor] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """AWQ scales (searched, then folded) and auto-clip for one block.

    Args:
        layer_factory: builds a DecoderLayer from relative-name weights.
        weights: the block's tensors by relative name (float32; not modified).
        specs: target GridSpec by relative module name (``self_attn.q_proj``) for each linear
            that is quantized; others stay FP and are never changed.
        h: float32 ``[n, T, hidden]`` block inputs used for the statistics and the search.
        folded_out: if given, receives the folded weights before clipping (the FP block the
            quantized one approximates; e.g. the reference of a LoRC residual).
    Returns:
        ``(new_weights, report)``: folded and clipped weights (norms and biases included) and
        ``{"scales": {pair: {...}}, "clip": {module: mean shrink}}``.
    """
    w = dict(weights)
    report: dict[str, Any] = {"scales": {}, "clip": {}}
    gqa_dims = (arch.n_heads, arch.n_kv_heads, arch.head_dim)
    if cfg.scale:
        cap = _Captured(layer_factory(weights), h, rope)
        found = []
        for pair, prev, linears in SCALE_PAIRS:
            touched = list(linears) + ([] if prev.endswith("layernorm") else [prev])
            if any(t not in specs for t in touched) or (pair == "vo" and not cfg.vo):
                report["scales"][pair] = {"skipped": True}
                continue
            gqa = gqa_dims if pair == "vo" else None
            s_prev, s_cols, rep = _search(cap, pair, weights, specs, cfg, gqa)
            found.append((pair, s_prev, s_cols))
            report["scales"][pair] = rep
        del cap
        for pair, s_prev, s_cols in found:
            fold_scales(w, pair, s_prev, s_cols)
    if folded_out is not None:
        folded_out.update(w)
    if cfg.clip:
        cap = _Captured(layer_factory(w), h, rope)
        inputs = {"self_attn.v_proj": cap.x_attn, "self_attn.o_proj": cap.x_o,
                  "mlp.gate_proj": cap.x_mlp, "mlp.up_proj": cap.x_mlp, "mlp.down_proj": cap.x_down}
        for lin, x in inputs.items():
            if lin in specs and lin not in CLIP_SKIP:
                xs = _token_subset(x, cfg.clip_tokens)
                w[f"{lin}.weight"], shrink = clip_weight(w[f"{lin}.weight"], xs, specs[lin],
                                                         cfg, lin)
                report["clip"][lin] = shrink
    return w, report
