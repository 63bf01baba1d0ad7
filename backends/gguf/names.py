"""Hugging Face <-> llama.cpp tensor names and the Q/K RoPE row permutation (both directions).

The IR keeps Hugging Face names and HF row order; a GGUF file holds llama.cpp names and, for the
``llama`` architecture (Llama, Mistral), Q/K rows in GGML's interleaved-pair RoPE order, exactly
as llama.cpp's ``convert_hf_to_gguf.py`` writes them. ``qwen2`` uses NEOX RoPE in llama.cpp
(rotate-half, the HF order), so its rows are not permuted.

| HF name (``model.layers.N.`` prefix for per-layer) | GGUF name                 | permuted by  |
|------------------------------------------------------|---------------------------|--------------|
| ``model.embed_tokens.weight``                        | ``token_embd.weight``     |              |
| ``model.norm.weight``                                | ``output_norm.weight``    |              |
| ``lm_head.weight``                                   | ``output.weight``         |              |
| ``input_layernorm.weight``                           | ``blk.N.attn_norm.weight``|              |
| ``post_attention_layernorm.weight``                  | ``blk.N.ffn_norm.weight`` |              |
| ``self_attn.q_proj.{weight,bias}``                   | ``blk.N.attn_q.*``        | n_head       |
| ``self_attn.k_proj.{weight,bias}``                   | ``blk.N.attn_k.*``        | n_head_kv    |
| ``self_attn.v_proj.{weight,bias}``                   | ``blk.N.attn_v.*``        |              |
| ``self_attn.o_proj.weight``                          | ``blk.N.attn_output.*``   |              |
| ``mlp.gate_proj / up_proj / down_proj .weight``      | ``blk.N.ffn_gate/up/down``|              |
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from qexport.errors import UnsupportedError

__all__ = ["ARCHITECTURES", "gguf_arch", "hf_to_gguf", "gguf_to_hf", "permute_rows",
           "unpermute_rows", "rope_heads", "layer_index"]

# HF architectures -> (llama.cpp general.architecture, Q/K rows permuted for interleaved RoPE)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),   # convert_hf_to_gguf registers it as LlamaModel
    "Qwen2ForCausalLM": ("qwen2", False),    # LLAMA_ROPE_TYPE_NEOX: HF row order kept
}

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_arch(config: dict[str, Any]) -> str:
    """``general.architecture`` for an HF config (``llama`` or ``qwen2``)."""
    return _arch_entry(config)[0]


def _arch_entry(config: dict[str, Any]) -> tuple[str, bool]:
    archs = config.get("architectures") or []
    name = str(archs[0]) if archs else "?"
    if name not in ARCHITECTURES:
        raise UnsupportedError(f"architecture {name}: GGUF lowering supports "
                               f"{sorted(ARCHITECTURES)} (not {name})")
    return ARCHITECTURES[name]


def hf_to_gguf(name: str) -> str:
    """llama.cpp name of an HF tensor name; UnsupportedError for names outside the table."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise UnsupportedError(f"{name}: no llama.cpp tensor name for it (expected an embedding, "
                           "norm, lm_head or a Llama/Mistral/Qwen2 attention/MLP tensor)")


def gguf_to_hf(name: str) -> str:
    """HF name of a llama.cpp tensor name (inverse of :func:`hf_to_gguf`)."""
    if name in _GLOBAL_INV:
        return _GLOBAL_INV[name]
    m = _GGUF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_INV:
        return f"model.layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}.{m.group(3)}"
    raise UnsupportedError(f"{name}: unknown llama.cpp tensor name (expected token_embd, "
                           "output_norm, output or blk.N.{attn_*,ffn_*})")


def layer_index(name: str) -> int | None:
    """Block index of an HF or GGUF per-layer name, else None."""
    m = _HF_LAYER_RE.match(name) or _GGUF_LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def rope_heads(hf_name: str, config: dict[str, Any]) -> int | None:
    """Number of heads to permute ``hf_name``'s rows with, or None when it is not permuted.

    q_proj (weight and bias) -> num_attention_heads, k_proj -> num_key_value_heads, only for
    architectures whose llama.cpp RoPE is the interleaved ("normal") kind.
    """
    if not _arch_entry(config)[1]:
        return None
    m = _HF_LAYER_RE.match(hf_name)
    if not m:
        return None
    n_head = int(config["num_attention_heads"])
    if m.group(2) == "self_attn.q_proj":
        return n_head
    if m.group(2) == "self_attn.k_proj":
        return int(config.get("num_key_value_heads") or n_head)
    return None


def _check_rows(w: np.ndarray, n_head: int) -> None:
    if w.shape[0] % (2 * n_head):
        raise UnsupportedError(f"RoPE permutation: {w.shape[0]} rows expected a multiple of "
                               f"2 * {n_head} heads")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGML interleaved order, along axis 0 of any array whose
    first axis is the output rows (weights ``[out, in]``, biases ``[out]``, codes, scales).

    Within each head, row ``j`` of the first half and row ``j`` of the second half become rows
    ``2j`` and ``2j+1``.
    """
    _check_rows(w, n_head)
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rows` (GGML interleaved -> HF rotate-half)."""
    _check_rows(w, n_head)
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
