"""Choosing a GridSpec per tensor: by target + options, by registry name, or by a GGUF recipe.

A *plan* maps every tensor to quantize (HF name) to a :class:`TensorPlan` (its GridSpec and
the reason it was chosen, e.g. a llama.cpp fallback), and is recorded in the IR's recipe so
``qexport inspect`` shows the mix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qexport.errors import UnsupportedError
from qexport.grids import GridSpec, ZeroDomain

__all__ = ["TensorPlan", "TARGETS", "resolve_spec", "target_spec", "plan_uniform",
           "LINEAR_SUFFIXES", "linear_names"]

TARGETS = ("ir", "gguf", "onnx", "vllm")
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_names(n_layers: int) -> list[str]:
    """HF names of every decoder linear weight, layer by layer."""
    return [f"model.layers.{i}.{s}.weight" for i in range(n_layers) for s in LINEAR_SUFFIXES]


@dataclass(frozen=True)
class TensorPlan:
    spec: GridSpec
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.name, "reason": self.reason}


_AFFINE_RE = re.compile(r"^affine-w(\d)g(-?\d+)([sa])$")


def resolve_spec(name: str) -> GridSpec:
    """A GridSpec by registry name: ``affine-w4g128s``, ``gguf-q4_k``, ``mnb-...``, ``ct-...``."""
    m = re.match(r"^codebook-w(\d)(row|g\d+)$", name)
    if m:
        return codebook_spec(int(m.group(1)), -1 if m.group(2) == "row" else int(m.group(2)[1:]))
    m = _AFFINE_RE.match(name)
    if m:
        return GridSpec.affine(int(m.group(1)), int(m.group(2)), m.group(3) == "s")
    if name.startswith("gguf-"):
        from qexport.backends.gguf.types import spec_for
        return spec_for(name[5:].upper())
    raise UnsupportedError(f"unknown grid {name!r}; expected affine-w<bits>g<group><s|a> "
                           "(e.g. affine-w4g128s) or gguf-<type> (e.g. gguf-q4_k), or use "
                           "--to with --bits/--group-size/--sym")


def target_spec(target: str, bits: int, group_size: int, sym: bool, *,
                fmt: str = "ct") -> GridSpec:
    """The grid a backend stores for uniform ``bits``/``group_size``/sym settings."""
    if target == "ir":
        return GridSpec.affine(bits, group_size, sym)
    if target == "onnx":
        from qexport.backends.onnx.specs import mnb_spec
        return mnb_spec(bits, group_size, sym)
    if target == "vllm":
        from qexport.backends.vllm.specs import vllm_spec
        return vllm_spec(bits, group_size, sym, fmt=fmt)
    if target == "gguf":
        raise UnsupportedError("--to gguf takes --type (a llama.cpp type or recipe such as "
                               "Q4_K_M), not --bits/--group-size")
    raise UnsupportedError(f"unknown target {target!r}; expected one of {list(TARGETS)}")


def codebook_spec(bits: int, group_size: int = -1) -> GridSpec:
    """Free non-uniform codebook (LeanQuant-nu): 2**bits fp16 values per row (or group)."""
    from qexport.grids import GridKind
    g = "row" if group_size == -1 else f"g{group_size}"
    return GridSpec(name=f"codebook-w{bits}{g}", kind=GridKind.CODEBOOK, bits=bits,
                    group_size=group_size, free_codebook=True)


def plan_uniform(names: list[str], spec: GridSpec) -> dict[str, TensorPlan]:
    return {n: TensorPlan(spec, "") for n in names}


def plan_gguf(recipe: str, config: dict[str, Any], shapes: dict[str, tuple[int, int]], *,
              pure: bool = False, overrides: dict[str, str] | None = None,
              imatrix: bool = False) -> dict[str, TensorPlan]:
    """llama-quantize's per-tensor choice for a recipe (Q4_K_M, ...) or a single type
    (``imatrix``: its rules when an importance matrix is given)."""
    from qexport.backends.gguf.recipes import plan_recipe
    from qexport.backends.gguf.types import spec_for
    plan = plan_recipe(recipe, config, shapes, pure=pure, overrides=overrides, imatrix=imatrix)
    # "F16"/"F32" entries mean "keep float" (e.g. a row llama.cpp cannot block): passthrough
    return {n: TensorPlan(spec_for(p.type_name), p.reason) for n, p in plan.items()
            if p.type_name.upper() not in ("F16", "F32")}


def describe(spec: GridSpec) -> str:
    """Short human label: ``Q4_K``-style for GGUF specs, else w<bits>g<group><s|a>."""
    if spec.name.startswith("gguf-"):
        return spec.name[5:].upper()
    if spec.free_codebook:
        return f"codebook w{spec.bits} " + ("per-row LUT" if spec.group_size == -1
                                             else f"g{spec.group_size} LUT")
    z = {ZeroDomain.NONE: "sym", ZeroDomain.INT: "asym", ZeroDomain.FLOAT: "fmin"}[spec.zero]
    return f"{spec.kind.value} w{spec.bits} g{spec.group_size} {z}"
