"""A small fp32 torch implementation of the supported decoder models (not transformers').

Math follows Hugging Face's Llama/Mistral/Qwen2: RMSNorm computed in fp32, RoPE in the
rotate-half convention (default or llama3 frequency scaling), grouped-query causal attention
(optionally a Mistral sliding window), SwiGLU MLP, tied or separate lm_head.

:class:`DecoderLayer` exposes its linears as ``nn.Linear`` modules under HF-relative names
(``self_attn.q_proj`` ... ``mlp.down_proj``) and splits its forward into stages so that a
calibration driver can capture the input of each true-sequential group of linears.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qexport.errors import InputError
from qexport.model.arch import ArchInfo, layer_prefix

__all__ = ["RMSNorm", "Rotary", "DecoderLayer", "CausalLM", "build_causal_lm", "as_tensor"]


def as_tensor(x: torch.Tensor | np.ndarray, name: str = "tensor") -> torch.Tensor:
    """float32 torch tensor sharing memory with a float32 numpy array where possible."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise InputError(f"{name}: expected a torch tensor or numpy array (not {type(x).__name__})")


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis, fp32."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rope_inv_freq(arch: ArchInfo) -> torch.Tensor:
    """Inverse frequencies ``[head_dim/2]`` (fp32), llama3-scaled when the config says so."""
    hd = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if arch.rope_type != "llama3":
        return inv
    p = arch.rope_scaling
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)   # long waves: divided
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """cos/sin tables ``[T, head_dim]`` for positions 0..T-1 (cached per length)."""

    def __init__(self, arch: ArchInfo) -> None:
        super().__init__()
        self.inv_freq = rope_inv_freq(arch)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len not in self._cache:
            pos = torch.arange(seq_len, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = {seq_len: (emb.cos(), emb.sin())}
        return self._cache[seq_len]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _sliding_mask(t: int, window: int) -> torch.Tensor:
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    return (j <= i) & (i - j < window)


class _Attention(nn.Module):
    def __init__(self, arch: ArchInfo, lin: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.arch = arch
        self.q_proj, self.k_proj = lin["self_attn.q_proj"], lin["self_attn.k_proj"]
        self.v_proj, self.o_proj = lin["self_attn.v_proj"], lin["self_attn.o_proj"]

    def context(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Attention output before o_proj: ``[B, T, n_heads*head_dim]``."""
        a = self.arch
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        gqa = a.n_heads != a.n_kv_heads
        if a.sliding_window is not None and t > a.sliding_window:
            mask = _sliding_mask(t, a.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim)

    def received_attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                           q_chunk: int = 256) -> torch.Tensor:
        """Squared attention each key position receives, averaged over heads: float32 ``[B, T]``,
        ``w[b, t] = mean_h sum_q A_h[b, q, t]^2`` (causal / sliding-window probabilities ``A``).

        An error ``e_t`` in the value of token ``t`` reaches the attention output of query ``q``
        as ``A[q, t] e_t``, so (errors of different tokens taken as uncorrelated) ``w`` weights
        each token's value error by its effect on the attention output. Attention sinks (the
        first token, receiving most of the attention) get weights in the hundreds. Queries are
        processed ``q_chunk`` at a time so memory stays ``B * n_heads * q_chunk * T`` floats.
        """
        a = self.arch
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        window = a.sliding_window if a.sliding_window is not None else t
        kt = k.transpose(-1, -2) * (1.0 / math.sqrt(a.head_dim))      # [B, heads, hd, T]
        w = torch.zeros(b, t, dtype=torch.float32)
        for q0 in range(0, t, q_chunk):
            q1 = min(q0 + q_chunk, t)
            k0 = max(0, q0 - window + 1)          # keys no query of the chunk can see: skipped
            rows = torch.arange(q0, q1)[:, None]
            keys = torch.arange(k0, q1)[None, :]
            bias = torch.zeros(q1 - q0, q1 - k0).masked_fill_(
                (keys > rows) | (rows - keys >= window), float("-inf"))
            p = torch.softmax(q[:, :, q0:q1] @ kt[..., k0:q1] + bias, dim=-1)
            w[:, k0:q1] += p.mul_(p).sum(2).mean(1)
        return w


class _MLP(nn.Module):
    def __init__(self, lin: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = lin["mlp.gate_proj"], lin["mlp.up_proj"]
        self.down_proj = lin["mlp.down_proj"]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Input of down_proj: ``silu(gate(x)) * up(x)``, ``[B, T, intermediate]``."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


def _relative(weights: Mapping[str, torch.Tensor | np.ndarray],
              layer_idx: int | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        rel = name
        if name.startswith("model.layers."):
            idx, _, rel = name[len("model.layers."):].partition(".")
            if layer_idx is not None and int(idx) != layer_idx:
                raise InputError(f"{name}: expected a tensor of layer {layer_idx}")
        out[rel] = as_tensor(w, name)
    return out


class DecoderLayer(nn.Module):
    """One decoder layer built from its weights (full or HF-relative names, numpy or torch).

    Stages (``h``: residual stream ``[B, T, hidden]``): :meth:`attn_input` (input of q/k/v),
    :meth:`attn_context` (input of o), :meth:`attn_residual`, :meth:`mlp_input` (input of
    gate/up), :meth:`mlp_hidden` (input of down), :meth:`mlp_residual`; :meth:`forward` chains
    them.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor | np.ndarray], arch: ArchInfo,
                 layer_idx: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        w = _relative(weights, layer_idx)
        p = layer_prefix(0)
        want = {k[len(p):]: v for k, v in arch.layer_shapes(0).items()}
        for name, shp in want.items():
            if name not in w:
                raise InputError(f"decoder layer: missing tensor {name}")
            if tuple(w[name].shape) != tuple(shp):
                raise InputError(f"decoder layer: tensor {name} expected shape {list(shp)} "
                                 f"(not {list(w[name].shape)})")
        extra = sorted(set(w) - set(want))
        if extra:
            raise InputError(f"decoder layer: unexpected tensor {extra[0]} for "
                             f"{arch.architecture}")
        lin = {m: _linear(w[f"{m}.weight"], w.get(f"{m}.bias")) for m in arch.linear_shapes()}
        self.input_layernorm = RMSNorm(w["input_layernorm.weight"], arch.rms_eps)
        self.self_attn = _Attention(arch, lin)
        self.post_attention_layernorm = RMSNorm(w["post_attention_layernorm.weight"], arch.rms_eps)
        self.mlp = _MLP(lin)

    def linear(self, name: str) -> nn.Linear:
        """The ``nn.Linear`` for an HF-relative (``mlp.up_proj``) or full weight name."""
        rel = name.removesuffix(".weight")
        if rel.startswith("model.layers."):
            rel = rel[len("model.layers."):].partition(".")[2]
        mod = self.get_submodule(rel)
        if not isinstance(mod, nn.Linear):
            raise InputError(f"{name}: not a linear of the decoder layer")
        return mod

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(h)

    def attn_context(self, h: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.self_attn.context(self.attn_input(h), rope)

    def attn_residual(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return h + self.self_attn.o_proj(ctx)

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(h)

    def mlp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.hidden(self.mlp_input(h))

    def mlp_residual(self, h: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return h + self.mlp.down_proj(act)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.attn_residual(h, self.attn_context(h, rope))
        return self.mlp_residual(h, self.mlp_hidden(h))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and lm_head (tied to the embedding if configured)."""

    def __init__(self, arch: ArchInfo, embed: torch.Tensor, layers: list[DecoderLayer],
                 norm: torch.Tensor, lm_head: torch.Tensor | None) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(norm, arch.rms_eps)
        self.lm_head = None if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self.rotary = Rotary(arch)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(self.norm(h), w)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` int ``[B, T]`` (positions 0..T-1) -> logits float32 ``[B, T, vocab]``."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids expected shape [B, T] (not {list(input_ids.shape)})")
        rope = self.rotary(input_ids.shape[1])
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, rope)
        return self.head(h)


def build_causal_lm(config: dict, state_dict: Mapping[str, torch.Tensor | np.ndarray]) -> CausalLM:
    """A :class:`CausalLM` from an HF config dict and a full state dict (HF names, float32;
    e.g. ``QModel.state_dict()`` or ``SourceModel.state_dict()``). Strict about names/shapes."""
    arch = ArchInfo.from_config(config)
    expected = arch.expected_shapes()
    names = set(state_dict)
    missing = [n for n in expected if n not in names]
    if missing:
        raise InputError(f"state dict: missing tensor {missing[0]} ({len(missing)} missing)")
    extra = sorted(names - set(expected))
    if extra:
        raise InputError(f"state dict: unexpected tensor {extra[0]} for {arch.architecture}"
                         + (" (embeddings are tied)" if extra[0] == "lm_head.weight" else ""))
    for n, shp in expected.items():
        if tuple(state_dict[n].shape) != tuple(shp):
            raise InputError(f"state dict: tensor {n} expected shape {list(shp)} "
                             f"(not {list(state_dict[n].shape)})")
    layers = []
    for i in range(arch.n_layers):
        layers.append(DecoderLayer({n: state_dict[n] for n in arch.layer_shapes(i)}, arch, i))
    lm_head = None if arch.tie_word_embeddings else as_tensor(state_dict["lm_head.weight"])
    return CausalLM(arch, as_tensor(state_dict["model.embed_tokens.weight"]), layers,
                    as_tensor(state_dict["model.norm.weight"]), lm_head)
