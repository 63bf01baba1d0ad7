"""llama-quantize's per-tensor type choice ("mixtures" such as Q4_K_M), by llama.cpp's names.

Mirrors ``llama_tensor_get_type`` in llama.cpp ``src/llama-quant.cpp`` for dense Llama /
Mistral / Qwen2 models (no MoE, not Falcon), without and with an imatrix:

| recipe | default | attn_v                          | ffn_down                        | attn_output |
|--------|---------|---------------------------------|---------------------------------|-------------|
| Q2_K   | Q2_K    | Q4_K if n_gqa >= 4 else Q3_K    | Q3_K                            | Q3_K        |
| Q3_K_S | Q3_K    |                                 |                                 |             |
| Q3_K_M | Q3_K    | Q5_K if i < 2 else Q4_K         | Q5_K if i < n/16 else Q4_K      | Q4_K        |
| Q3_K_L | Q3_K    | Q5_K                            | Q5_K                            | Q5_K        |
| Q4_K_S | Q4_K    | Q5_K if i < 4                   | Q5_K if i < n/8                 |             |
| Q4_K_M | Q4_K    | Q6_K if use_more_bits(i, n)     | Q6_K if use_more_bits(i, n)     |             |
| Q5_K_S | Q5_K    |                                 |                                 |             |
| Q5_K_M | Q5_K    | Q6_K if use_more_bits(i, n)     | Q6_K if use_more_bits(i, n)     |             |
| Q6_K, Q8_0, Q4_1, Q5_1 | itself |                   |                                 |             |
| Q4_0 / Q5_0 | itself |                            | Q4_1 / Q5_1 if imatrix and i < n/8 |          |
| IQ4_NL / IQ4_XS | itself | Q5_K if n_gqa >= 4   | Q5_K if i < n/8 and no imatrix  |             |

- ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division).
- ``output.weight`` (and ``token_embd`` when embeddings are tied, i.e. there is no
  ``output.weight``): Q8_0 if ``in % block(default) != 0``, else Q6_K unless the default is Q8_0.
  An untied ``token_embd`` keeps the default type. A 70B-type model (80 layers, GQA) lifts a
  Q3_K/Q4_K attn_v to Q5_K.
- Then the row-length fallback (``tensor_type_fallback``) when ``in % block != 0``:
  Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, and F16 if the
  fallback's 32-block still does not divide the row.
- ``pure=True`` skips the mixture (every tensor the default type, fallback still applies);
  ``overrides`` (``{regex: TYPE}``, first match wins, searched in the GGUF and the HF name) are
  llama-quantize's ``--tensor-type``: they skip the mixture for that tensor, fallback applies.
- Norms and other 1-D tensors are never quantized (F32).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import gguf

from qexport.errors import UnsupportedError

from .names import gguf_arch, hf_to_gguf, layer_index

__all__ = ["TensorPlan", "RECIPES", "BLOCK", "plan_recipe", "recipe_file_type",
           "use_more_bits", "fallback_type", "file_type_name"]

# elements per block along a row (ggml ne[0]); F16/F32 hold any length
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32,
         "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
         "F16": 1, "F32": 1}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "IQ4_XS": "IQ4_NL"}


@dataclass(frozen=True)
class TensorPlan:
    """The GGUF type chosen for one tensor and why (e.g. ``"fallback Q4_K->Q5_0: 576 % 256
    != 0"``). ``type_name`` is a ggml type name (``Q4_K``) or ``F16`` / ``F32`` (kept float)."""

    type_name: str
    reason: str


@dataclass(frozen=True)
class Ctx:
    """What a rule sees: layer ``i`` of ``n``, the GQA ratio, whether an imatrix is used."""

    i: int
    n: int
    n_gqa: int
    imatrix: bool


Rule = Callable[[Ctx], "str | None"]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer selector for the *_M mixtures."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Recipe:
    default: str
    attn_v: Rule | None = None
    ffn_down: Rule | None = None
    attn_output: Rule | None = None


def _umb(t: str) -> Rule:
    return lambda c: t if use_more_bits(c.i, c.n) else None


RECIPES: dict[str, Recipe] = {
    "Q4_0": Recipe("Q4_0", ffn_down=lambda c: "Q4_1" if c.imatrix and c.i < c.n // 8 else None),
    "Q4_1": Recipe("Q4_1"),
    "Q5_0": Recipe("Q5_0", ffn_down=lambda c: "Q5_1" if c.imatrix and c.i < c.n // 8 else None),
    "Q5_1": Recipe("Q5_1"),
    "Q8_0": Recipe("Q8_0"),
    "Q2_K": Recipe("Q2_K", attn_v=lambda c: "Q4_K" if c.n_gqa >= 4 else "Q3_K",
                   ffn_down=lambda c: "Q3_K", attn_output=lambda c: "Q3_K"),
    "Q3_K_S": Recipe("Q3_K"),
    "Q3_K_M": Recipe("Q3_K", attn_v=lambda c: "Q5_K" if c.i < 2 else "Q4_K",
                     ffn_down=lambda c: "Q5_K" if c.i < c.n // 16 else "Q4_K",
                     attn_output=lambda c: "Q4_K"),
    "Q3_K_L": Recipe("Q3_K", attn_v=lambda c: "Q5_K", ffn_down=lambda c: "Q5_K",
                     attn_output=lambda c: "Q5_K"),
    "Q4_K_S": Recipe("Q4_K", attn_v=lambda c: "Q5_K" if c.i < 4 else None,
                     ffn_down=lambda c: "Q5_K" if c.i < c.n // 8 else None),
    "Q4_K_M": Recipe("Q4_K", attn_v=_umb("Q6_K"), ffn_down=_umb("Q6_K")),
    "Q5_K_S": Recipe("Q5_K"),
    "Q5_K_M": Recipe("Q5_K", attn_v=_umb("Q6_K"), ffn_down=_umb("Q6_K")),
    "Q6_K": Recipe("Q6_K"),
    "IQ4_NL": Recipe("IQ4_NL", attn_v=lambda c: "Q5_K" if c.n_gqa >= 4 else None,
                     ffn_down=lambda c: "Q5_K" if c.i < c.n // 8 and not c.imatrix else None),
    "IQ4_XS": Recipe("IQ4_XS", attn_v=lambda c: "Q5_K" if c.n_gqa >= 4 else None,
                     ffn_down=lambda c: "Q5_K" if c.i < c.n // 8 and not c.imatrix else None),
}
_CATEGORY_RULE = {"attn_v": "attn_v", "ffn_down": "ffn_down", "attn_output": "attn_output"}


def _check_recipe(recipe: str) -> Recipe:
    if recipe not in RECIPES:
        raise UnsupportedError(f"GGUF recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def recipe_file_type(recipe: str) -> int:
    """``general.file_type`` (gguf.LlamaFileType) of a recipe, e.g. Q4_K_M -> 15."""
    _check_recipe(recipe)
    return int(gguf.LlamaFileType[f"MOSTLY_{recipe}"])


def file_type_name(value: int) -> str:
    """Recipe name of a ``general.file_type`` value (``ALL_F32``, ``MOSTLY_Q4_K_M`` -> Q4_K_M)."""
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"unknown({value})"
    return name.removeprefix("MOSTLY_")


def fallback_type(type_name: str, in_features: int) -> tuple[str, str | None]:
    """llama.cpp's ``tensor_type_fallback``: (type, reason or None when unchanged)."""
    blk = BLOCK[type_name]
    if in_features % blk == 0:
        return type_name, None
    if type_name not in FALLBACK:
        raise UnsupportedError(f"no GGUF fallback for {type_name} with rows of {in_features} "
                               f"(not a multiple of {blk})")
    new = FALLBACK[type_name]
    if in_features % BLOCK[new]:
        new = "F16"
    return new, f"fallback {type_name}->{new}: {in_features} % {blk} != 0"


def _category(gguf_name: str) -> str:
    if gguf_name == "output.weight":
        return "output"
    if gguf_name == "token_embd.weight":
        return "token_embd"
    part = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else "other"
    return part if part in _CATEGORY_RULE else "other"


def _mixture(rec: Recipe, recipe: str, cat: str, in_f: int, ctx: Ctx, tied: bool,
             is70b: bool) -> tuple[str, str]:
    t = rec.default
    if cat == "output" or (cat == "token_embd" and tied):
        what = "output" if cat == "output" else "tied token_embd"
        if in_f % BLOCK[t]:
            return "Q8_0", f"{what}: Q8_0 ({in_f} % {BLOCK[t]} != 0)"
        if t != "Q8_0":
            return "Q6_K", f"{what}: Q6_K"
        return t, f"{what}: Q8_0"
    rule = getattr(rec, cat, None) if cat in _CATEGORY_RULE else None
    bumped = rule(ctx) if rule is not None else None
    if bumped is not None and bumped != t:
        t, why = bumped, f"{cat} {recipe} rule (layer {ctx.i}/{ctx.n}) -> {bumped}"
    else:
        why = f"default {t}"
    if cat == "attn_v" and is70b and t in ("Q3_K", "Q4_K"):
        t, why = "Q5_K", f"{why}; 70B attn_v -> Q5_K"
    return t, why


def plan_recipe(recipe: str, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], *,
                pure: bool = False, overrides: dict[str, str] | None = None,
                imatrix: bool = False) -> dict[str, TensorPlan]:
    """Per-tensor GGUF types of ``recipe`` for the HF weights in ``shapes``.

    Args:
        recipe: a name in :data:`RECIPES` (UnsupportedError lists them otherwise).
        config: the HF config (layer/head counts, architecture).
        shapes: HF name -> shape (``[out, in]`` for weights); include ``model.embed_tokens``
            and ``lm_head`` (absent ``lm_head`` means tied embeddings, as in llama.cpp).
        pure: every quantizable tensor gets the default type (``--pure``).
        overrides: ``{regex: TYPE}`` like ``--tensor-type``; TYPE a ggml type name or F16/F32.
        imatrix: whether an importance matrix is used (changes IQ4_* / Q4_0 / Q5_0 ffn_down).

    Returns:
        HF name -> TensorPlan(type_name, reason).
    """
    rec = _check_recipe(recipe)
    pats = []
    for pat, typ in (overrides or {}).items():
        if typ not in BLOCK:
            raise UnsupportedError(f"override {pat!r}: type {typ!r} expected one of "
                                   f"{sorted(BLOCK)}")
        pats.append((re.compile(pat), typ))
    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    is70b = n_layer == 80 and (n_head != n_kv or gguf_arch(config) == "qwen2")
    tied = "lm_head.weight" not in shapes
    plans: dict[str, TensorPlan] = {}
    for name, shape in shapes.items():
        gname = hf_to_gguf(name)
        if len(shape) < 2 or gname.endswith("_norm.weight") or not gname.endswith("weight"):
            plans[name] = TensorPlan("F32", "not quantized (1-D / norm / bias)")
            continue
        in_f = int(shape[-1])
        hit = next((t for p, t in pats if p.search(gname) or p.search(name)), None)
        if hit is not None:
            t, why = hit, f"override -> {hit}"
        elif pure:
            t, why = rec.default, f"pure {rec.default}"
        else:
            li = layer_index(name)
            ctx = Ctx(i=li if li is not None else 0, n=n_layer, n_gqa=n_head // n_kv,
                      imatrix=imatrix)
            t, why = _mixture(rec, recipe, _category(gname), in_f, ctx, tied, is70b)
        if t not in ("F16", "F32"):
            t, fb = fallback_type(t, in_f)
            if fb:
                why = f"{why}; {fb}"
        plans[name] = TensorPlan(t, why)
    return plans
