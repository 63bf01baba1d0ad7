"""Lowering dispatch: an IR -> a target artifact, without changing a value.

``retarget`` re-labels each QTensor with the target's own GridSpec when the tensor's grid is a
subset of it (same decode, representable parameters), so one quantization run can be lowered to
every target whose grid agrees (e.g. an ``affine-w4g32s`` IR is exactly GGUF Q4_0 and ONNX
MatMulNBits 4-bit block 32). Anything else is refused with the tensor named: lowering never
re-quantizes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from qexport.errors import InputError, LoweringError, UnsupportedError
from qexport.grids import GridSpec, ZeroDomain
from qexport.ir import QModel
from qexport.irstream import Relabelled, is_lazy, tensor_meta

__all__ = ["retarget", "lower", "detect_artifact", "verify_artifact", "EXPORT_TARGETS"]

EXPORT_TARGETS = ("gguf", "onnx", "vllm")


def _gguf_candidates(spec: GridSpec) -> list[GridSpec]:
    from qexport.backends.gguf.types import GGUF_TYPES, spec_for
    return [spec_for(name) for name in GGUF_TYPES]


def _uniform_candidate(target: str, spec: GridSpec, fmt: str) -> list[GridSpec]:
    if spec.kind.value != "affine" or spec.zero == ZeroDomain.FLOAT:
        return []
    sym = spec.zero == ZeroDomain.NONE
    if target == "onnx":
        from qexport.backends.onnx.specs import mnb_spec
        make: Callable[..., GridSpec] = lambda: mnb_spec(spec.bits, spec.group_size, sym)
    else:
        from qexport.backends.vllm.specs import vllm_spec
        make = lambda: vllm_spec(spec.bits, spec.group_size, sym, fmt=fmt)
    try:
        return [make()]
    except (UnsupportedError, LoweringError, ValueError) as e:
        raise LoweringError(f"{target} cannot hold {spec.name}: {e}") from e


def _target_spec(name: str, spec: GridSpec, shape: tuple[int, ...], target: str,
                 fmt: str) -> GridSpec:
    """The first of ``target``'s specs that holds ``spec`` exactly at ``shape``."""
    if target == "gguf":
        cands = _gguf_candidates(spec)
    elif target == "onnx" and spec.kind.value == "codebook":
        cands = [spec]                             # the ONNX backend decides (LUT or refusal)
    else:
        cands = _uniform_candidate(target, spec, fmt)
    reasons = []
    for cand in cands:
        why = None if cand.name == spec.name else spec.is_subset_of(cand)
        if why is None:
            try:
                cand.check_shape(shape, name)
            except ValueError as e:
                why = str(e)
        if why is None:
            return cand
        reasons.append(f"{cand.name}: {why}")
    raise LoweringError(f"{name}: grid {spec.name} cannot be lowered to {target} "
                        f"without re-quantizing ({'; '.join(reasons[:3]) or 'no format'}"
                        "); quantize with --to " + target)


def retarget(model: QModel, target: str, *, fmt: str = "ct") -> QModel:
    """A shallow copy of ``model`` whose QTensors carry ``target``'s own specs.

    Specs and shapes come from the manifest when the model is lazy (``load_ir(lazy=True)``),
    and the result is then lazy too: no tensor is loaded here.
    """
    if target not in EXPORT_TARGETS:
        raise UnsupportedError(f"unknown target {target!r}; expected one of {list(EXPORT_TARGETS)}")
    specs = {}
    for name in model.tensors:
        spec, shape, _ = tensor_meta(model.tensors, name)
        specs[name] = _target_spec(name, spec, shape, target, fmt)
    if is_lazy(model.tensors):
        return dataclasses.replace(model, tensors=Relabelled(model.tensors, specs))
    return dataclasses.replace(model, tensors={n: dataclasses.replace(qt, spec=specs[n])
                                               for n, qt in model.tensors.items()})


def lower(model: QModel, target: str, out: str | Path, *, force: bool = False,
          fmt: str = "ct", dtype: str | None = None, accuracy_level: int = 0,
          progress: bool = False) -> list[Path]:
    """Write ``model`` as a ``target`` artifact at ``out`` (+ an adapter when it has LoRC).

    The vLLM backend checks and relabels grids itself (it names the format's own limits,
    e.g. GPTQ v1's zero point), so only GGUF and ONNX go through :func:`retarget` here.
    """
    if target != "vllm":
        model = retarget(model, target, fmt=fmt)
    out = Path(out)
    has_lorc = any(tensor_meta(model.tensors, n)[2] for n in model.tensors)
    if target == "gguf":
        from qexport.backends.gguf.writer import lower_gguf
        paths = [lower_gguf(model, out, force=force, progress=progress)]
        if has_lorc:
            from qexport.backends.gguf.lora import lower_gguf_lora
            paths.append(lower_gguf_lora(model, out.with_name(out.stem + ".lora.gguf"),
                                         force=force))
        return paths
    if target == "onnx":
        from qexport.backends.onnx.lower import lower_onnx
        return [lower_onnx(model, out, dtype=dtype or "fp32", accuracy_level=accuracy_level,
                           force=force)]
    from qexport.backends.vllm.lower import lower_vllm
    from qexport.backends.vllm.peft import adapter_dir, has_adapter
    paths = [lower_vllm(model, out, fmt=fmt, dtype=dtype or "float16", force=force)]
    if has_adapter(model):
        paths.append(adapter_dir(out))
    return paths


def detect_artifact(path: str | Path) -> str:
    """'ir' | 'gguf' | 'onnx' | 'vllm' for a path, from its content."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise InputError(f"{p}: not a GGUF file (wrong magic) and not a folder")
    if (p / "manifest.json").is_file():
        return "ir"
    if (p / "model.onnx").is_file():
        return "onnx"
    if (p / "config.json").is_file():
        return "vllm"
    raise InputError(f"{p}: expected an IR folder, a .gguf file, an ONNX folder (model.onnx) "
                     "or an HF folder (config.json)")


def verify_artifact(path: str | Path, model: QModel) -> Any:
    """Decode ``path`` and compare it with ``model``; returns the backend's report."""
    kind = detect_artifact(path)
    if kind == "gguf":
        from qexport.backends.gguf.verify import verify_gguf
        return verify_gguf(path, retarget(model, "gguf"))
    if kind == "onnx":
        from qexport.backends.onnx.verify import verify_onnx
        return verify_onnx(path, retarget(model, "onnx"))
    if kind == "vllm":
        from qexport.backends.vllm.verify import verify_vllm
        return verify_vllm(path, model, gptqmodel=True)   # GPTQ: + GPTQModel if installed
    raise InputError(f"{path}: is an IR folder; verify takes an exported artifact")
