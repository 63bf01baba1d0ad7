"""Architecture description of a supported decoder-only model, parsed strictly from an HF config.

Supported: Llama, Mistral and Qwen2 causal LMs (RMSNorm, RoPE in the rotate-half convention,
grouped-query attention, SwiGLU MLP). Tensor names and orientation are Hugging Face's
(``model.layers.{i}.self_attn.q_proj.weight``, shape ``[out_features, in_features]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qexport.errors import InputError, UnsupportedError

__all__ = ["ArchInfo", "SUPPORTED", "ROPE_TYPES", "LINEAR_GROUPS", "LINEAR_MODULES",
           "layer_prefix", "linear_names"]

SUPPORTED: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES: tuple[str, ...] = ("default", "llama3")
LLAMA3_ROPE_KEYS: tuple[str, ...] = ("factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings")

# True-sequential quantization order: each group shares one input (hence one Hessian).
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_MODULES: tuple[str, ...] = tuple(m for g in LINEAR_GROUPS for m in g)


def layer_prefix(layer_idx: int) -> str:
    """``model.layers.{i}.``: the HF prefix of decoder layer ``i``."""
    return f"model.layers.{layer_idx}."


def linear_names(layer_idx: int) -> list[list[str]]:
    """HF weight names of layer ``i``'s linears in true-sequential groups:
    ``[[q, k, v], [o], [gate, up], [down]]``."""
    p = layer_prefix(layer_idx)
    return [[f"{p}{m}.weight" for m in group] for group in LINEAR_GROUPS]


def _need(cfg: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in cfg or cfg[key] is None:
        raise InputError(f"config.json: missing field '{key}'")
    val = cfg[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise InputError(f"config.json: field '{key}' expected {names} (not "
                         f"{type(val).__name__} {val!r})")
    return val


def _positive(cfg: dict[str, Any], key: str) -> int:
    val = _need(cfg, key, int)
    if val <= 0:
        raise InputError(f"config.json: field '{key}' expected a positive integer (not {val})")
    return val


def _rope(cfg: dict[str, Any]) -> tuple[float, str, dict[str, float]]:
    """(theta, rope_type, scaling parameters) from ``rope_parameters`` (transformers >= 5) or the
    legacy ``rope_theta`` + ``rope_scaling`` fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or {}
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise InputError(f"config.json: field 'rope_theta' expected a positive number "
                         f"(not {theta!r})")
    if not isinstance(scaling, dict):
        raise InputError(f"config.json: field 'rope_scaling' expected a dict or null "
                         f"(not {scaling!r})")
    rtype = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rtype not in ROPE_TYPES:
        raise UnsupportedError(f"config.json: rope scaling '{rtype}' is not supported "
                               f"(supported: {', '.join(ROPE_TYPES)})")
    extra: dict[str, float] = {}
    if rtype == "llama3":
        for k in LLAMA3_ROPE_KEYS:
            v = scaling.get(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise InputError(f"config.json: llama3 rope scaling field '{k}' expected a "
                                 f"number (not {v!r})")
            extra[k] = float(v)
        if extra["high_freq_factor"] <= extra["low_freq_factor"]:
            raise InputError("config.json: llama3 rope scaling expected high_freq_factor > "
                             f"low_freq_factor (not {extra['high_freq_factor']} <= "
                             f"{extra['low_freq_factor']})")
    prf = scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise UnsupportedError(f"config.json: partial_rotary_factor {prf} is not supported "
                               "(only 1.0)")
    return float(theta), rtype, extra


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    layer_types = cfg.get("layer_types") or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd or cfg.get("use_sliding_window"):
        what = ", ".join(odd) if odd else "use_sliding_window"
        raise UnsupportedError(f"config.json: sliding-window attention ({what}) is not "
                               "supported for Qwen2-style layer types (only full_attention)")
    if arch != "MistralForCausalLM":
        return None
    win = cfg.get("sliding_window")
    if win is None:
        return None
    if not isinstance(win, int) or isinstance(win, bool) or win <= 0:
        raise InputError(f"config.json: field 'sliding_window' expected a positive integer or "
                         f"null (not {win!r})")
    return win


@dataclass(frozen=True)
class ArchInfo:
    """Hyper-parameters of a supported decoder-only model (see :meth:`from_config`).

    ``attention_bias``: q/k/v (and for Llama also o) projections carry a bias; Qwen2 always has
    q/k/v biases. ``rope_scaling`` holds the llama3 parameters (empty for "default").
    """

    architecture: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    rope_type: str
    rms_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None = None
    rope_scaling: dict[str, float] = field(default_factory=dict, hash=False, compare=True)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ArchInfo":
        """Parse and check an HF ``config.json`` dict; InputError / UnsupportedError on problems."""
        if not isinstance(cfg, dict):
            raise InputError(f"config.json: expected a JSON object (not {type(cfg).__name__})")
        archs = _need(cfg, "architectures", list)
        if len(archs) != 1 or archs[0] not in SUPPORTED:
            raise UnsupportedError(f"architecture {archs} is not supported (supported: "
                                   f"{', '.join(SUPPORTED)})")
        arch = archs[0]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedError(f"config.json: hidden_act '{act}' is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise UnsupportedError("config.json: mlp_bias true is not supported")
        hidden, heads = _positive(cfg, "hidden_size"), _positive(cfg, "num_attention_heads")
        kv = cfg.get("num_key_value_heads", heads)
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            raise InputError(f"config.json: field 'num_key_value_heads' expected a divisor of "
                             f"num_attention_heads={heads} (not {kv!r})")
        head_dim = cfg.get("head_dim") or hidden // heads
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise InputError(f"config.json: field 'head_dim' expected a positive even integer "
                             f"(not {head_dim!r})")
        if "head_dim" not in cfg and hidden % heads:
            raise InputError(f"config.json: field 'hidden_size' expected a multiple of "
                             f"num_attention_heads={heads} (not {hidden})")
        eps = _need(cfg, "rms_norm_eps", (int, float))
        if eps <= 0:
            raise InputError(f"config.json: field 'rms_norm_eps' expected > 0 (not {eps})")
        tie = cfg.get("tie_word_embeddings", arch != "Qwen2ForCausalLM")
        if not isinstance(tie, bool):
            raise InputError(f"config.json: field 'tie_word_embeddings' expected a bool "
                             f"(not {tie!r})")
        bias = True if arch == "Qwen2ForCausalLM" else bool(cfg.get("attention_bias", False))
        theta, rtype, scaling = _rope(cfg)
        return cls(architecture=arch, n_layers=_positive(cfg, "num_hidden_layers"), hidden=hidden,
                   intermediate=_positive(cfg, "intermediate_size"), n_heads=heads,
                   n_kv_heads=kv, head_dim=head_dim, vocab=_positive(cfg, "vocab_size"),
                   rope_theta=theta, rope_type=rtype, rms_eps=float(eps),
                   tie_word_embeddings=tie, attention_bias=bias,
                   sliding_window=_sliding_window(cfg, arch), rope_scaling=scaling)

    @property
    def biased_linears(self) -> tuple[str, ...]:
        """HF-relative module names that carry a bias (Qwen2: q/k/v; Llama attention_bias: +o)."""
        if not self.attention_bias:
            return ()
        qkv = LINEAR_GROUPS[0]
        return qkv if self.architecture == "Qwen2ForCausalLM" else qkv + LINEAR_GROUPS[1]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of each decoder linear by HF-relative module name."""
        d, f = self.hidden, self.intermediate
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
                "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
                "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}

    def layer_shapes(self, layer_idx: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of decoder layer ``i`` (full HF names) with its expected shape."""
        p = layer_prefix(layer_idx)
        shapes: dict[str, tuple[int, ...]] = {f"{p}input_layernorm.weight": (self.hidden,),
                                              f"{p}post_attention_layernorm.weight": (self.hidden,)}
        for mod, shp in self.linear_shapes().items():
            shapes[f"{p}{mod}.weight"] = shp
            if mod in self.biased_linears:
                shapes[f"{p}{mod}.bias"] = (shp[0],)
        return shapes

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model (HF names) with its expected shape; no lm_head when tied."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.n_layers):
            shapes.update(self.layer_shapes(i))
        shapes["model.norm.weight"] = (self.hidden,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def linear_weight_names(self) -> list[str]:
        """All quantizable decoder linear weights (q/k/v/o/gate/up/down of every layer)."""
        return [n for i in range(self.n_layers) for g in linear_names(i) for n in g]
