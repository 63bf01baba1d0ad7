"""Decoder hyper-parameters read from a Hugging Face config dict, and the rotary cos/sin cache.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` with SiLU gated
MLPs and rotary types default / linear / llama3 (transformers' formulas, recomputed here in
float32 numpy). Anything else raises UnsupportedError naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qexport.errors import UnsupportedError

__all__ = ["DecoderConfig", "SUPPORTED_ARCHS", "decoder_config", "rope_cache"]

SUPPORTED_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                   "Qwen2ForCausalLM": "qwen2"}


@dataclass(frozen=True)
class DecoderConfig:
    arch: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_pos: int
    tie: bool
    sliding_window: int | None
    rope: dict[str, Any]


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:        # per-layer-type form
        rp = rp["full_attention"]
    if isinstance(rp, dict):
        out = dict(rp)
    else:
        out = dict(cfg.get("rope_scaling") or {})
        out.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    if out["rope_type"] not in ("default", "linear", "llama3"):
        raise UnsupportedError(f"config.rope_parameters.rope_type: expected default, linear or "
                               f"llama3 (not {out['rope_type']!r})")
    if float(out.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedError("config.partial_rotary_factor: expected 1.0 (not "
                               f"{out['partial_rotary_factor']})")
    return out


def decoder_config(cfg: dict[str, Any]) -> DecoderConfig:
    """Validate and read the fields the graph needs."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else "?"
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"config.architectures: expected one of {sorted(SUPPORTED_ARCHS)} "
                               f"(not {arch!r})")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"config.hidden_act: expected 'silu' (not {act!r})")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv:
        raise UnsupportedError(f"config: num_attention_heads {heads} expected a multiple of "
                               f"num_key_value_heads {kv}")
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if head_dim % 2:
        raise UnsupportedError(f"config.head_dim: expected an even number (not {head_dim})")
    window = cfg.get("sliding_window")
    if SUPPORTED_ARCHS[arch] == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types")
    if window is not None and layer_types and "sliding_attention" not in layer_types:
        window = None
    return DecoderConfig(
        arch=arch, model_type=SUPPORTED_ARCHS[arch], hidden=hidden,
        intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
        heads=heads, kv_heads=kv, head_dim=head_dim, vocab=int(cfg["vocab_size"]),
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_pos=int(cfg.get("max_position_embeddings", 2048)),
        tie=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None, rope=_rope_params(cfg))


def _inv_freq(dim: int, rope: dict[str, Any]) -> np.ndarray:
    base = np.float32(rope["rope_theta"])
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (base ** exps)).astype(np.float32)
    kind = rope["rope_type"]
    if kind == "linear":
        inv = (inv / np.float32(rope["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(rope["factor"])
        lo, hi = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old = float(rope["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * np.pi / inv.astype(np.float64)
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= hi_wl) & (wavelen <= lo_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cache(dc: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 ``[max_pos, head_dim]`` (``emb = cat(freqs, freqs)``)."""
    inv = _inv_freq(dc.head_dim, dc.rope)
    pos = np.arange(dc.max_pos, dtype=np.float32)
    freqs = (pos[:, None] * inv[None, :]).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
