"""lower_vllm: a QModel -> a Hugging Face folder vLLM serves (CT pack-quantized or GPTQ v1).

Steps: map every packed linear onto the format's own GridSpec (refusing, with the tensor named,
what the format cannot hold: grid kind, bits, ragged groups, GPTQ zero 0, scales the model dtype
would round), check that vLLM's fused layers (q/k/v, gate/up) share one grid, pack, then write
the folder atomically; LoRC factors go to a PEFT adapter in the sibling ``<out>-lora``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.atomic import atomic_output
from qexport.errors import LoweringError, UnsupportedError
from qexport.grids import GridError, GridSpec, validate
from qexport.ir import QModel, QTensor
from qexport.stfile import OffsetWriter

from .ct import ct_layer_tensors, ct_quantization_config
from .gptq import gptq_layer_tensors, gptq_quantization_config
from .hf_folder import (TORCH_DTYPES, dense_tensors, hf_config, is_dense_only, module_of,
                        st_bytes, st_entry, write_tokenizer)
from .peft import adapter_dir, has_adapter, write_peft_adapter
from .specs import FORMATS, dtype_scale, format_of, vllm_cpu_notes, vllm_spec

__all__ = ["lower_vllm", "plan_packed", "write_safetensors", "check_fused", "FUSED_GROUPS"]

#: projections vLLM loads into one fused layer: every member needs the same grid
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"),
                                             ("gate_proj", "up_proj"))
_LAYER_RE = re.compile(r"^(.*)\.([a-z_]+)\.weight$")


def _retarget(qt: QTensor, fmt: str, scale_dtype: str) -> QTensor:
    """``qt`` relabelled with the format's spec, after checking its data fits it."""
    try:
        bits, group, sym = format_of(qt.spec)
        spec = vllm_spec(bits, group, sym, fmt=fmt, scale_dtype=scale_dtype)
    except UnsupportedError as e:
        raise LoweringError(f"{qt.name}: {e}") from e
    if fmt == "gptq" and not sym and int(qt.grid.zeros.min()) < FORMATS["gptq"].asym_zero_min:
        gptq_layer_tensors(qt, "", torch.float16)          # raises the named zero-0 error
    try:
        validate(qt.codes, qt.grid, spec, qt.name)
    except GridError as e:
        raise LoweringError(f"{e} (vLLM {fmt} format, model dtype {scale_dtype})") from e
    return dataclasses.replace(qt, spec=spec)


@dataclass(frozen=True)
class Packed:
    """What the checks need of one packed linear (its data is packed again when written)."""

    name: str
    spec: GridSpec
    shape: tuple[int, ...]


def _layer_tensors(qt: QTensor, fmt: str, tdt: torch.dtype, ct_layout: str
                   ) -> dict[str, torch.Tensor]:
    prefix = module_of(qt.name)
    return (ct_layer_tensors(qt, prefix, tdt, ct_layout) if fmt == "ct"
            else gptq_layer_tensors(qt, prefix, tdt))


def plan_packed(model: QModel, fmt: str, dtype: str, ct_layout: str = "dense"
                ) -> tuple[dict[str, Packed], dict[str, tuple[str, tuple[int, ...], int]]]:
    """Check every packed linear (all but embeddings / lm_head) against the format, one
    QTensor in memory at a time; returns their :class:`Packed` records and the safetensors
    entries (dtype, shape, nbytes) of every tensor the folder's file will hold."""
    if fmt not in FORMATS:
        raise UnsupportedError(f"unknown vLLM checkpoint format {fmt!r}; expected one of "
                               f"{sorted(FORMATS)}")
    scale_dtype, tdt = dtype_scale(dtype), TORCH_DTYPES[dtype]
    packed, entries, not_fp16 = {}, {}, []
    for n in sorted(model.tensors):
        if is_dense_only(n):
            continue
        qt = _retarget(model.tensors[n], fmt, scale_dtype)
        packed[n] = Packed(n, qt.spec, tuple(qt.shape))
        off = _off_fp16(qt) if fmt == "gptq" and dtype == "bfloat16" else 0
        if off:
            not_fp16.append(f"{n} ({off} scales)")
        for k, t in _layer_tensors(qt, fmt, tdt, ct_layout).items():
            entries[k] = st_entry(t)
        del qt                                  # before the next one is read
    for n, t in dense_tensors(model, tdt):
        entries[n] = st_entry(t)
    if not_fp16:
        more = f" (+{len(not_fp16) - 3} more tensors)" if len(not_fp16) > 3 else ""
        warnings.warn("GPTQModel (transformers' GPTQ loader) keeps GPTQ scales in float16 even in "
                      "a bfloat16 model, and these bfloat16 scales are not float16 values, so it "
                      "will run rounded weights (vLLM runs them exactly): "
                      + "; ".join(not_fp16[:3]) + more + "; --dtype float16 avoids it",
                      stacklevel=3)
    return packed, entries


def _off_fp16(qt: QTensor) -> int:
    """How many of ``qt``'s scales change when rounded to float16 (0 when all are fp16 values)."""
    s = qt.grid.scales
    with np.errstate(over="ignore"):
        return int((s.astype(np.float16).astype(s.dtype) != s).sum())


def _grid_key(qt: Packed | None) -> tuple[int, int, bool] | None:
    return None if qt is None else format_of(qt.spec)


def _label(key: tuple[int, int, bool] | None) -> str:
    return "dense" if key is None else f"w{key[0]}g{key[1]}{'s' if key[2] else 'a'}"


def check_fused(packed: dict[str, Packed], all_names: set[str]) -> None:
    """Refuse q/k/v or gate/up members with different grids (or some packed, some dense)."""
    seen: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for name in sorted(all_names):
        m = _LAYER_RE.match(name)
        if not m:
            continue
        for group in FUSED_GROUPS:
            if m.group(2) in group:
                seen.setdefault((m.group(1), group), {})[name] = _grid_key(packed.get(name))
    for (parent, group), keys in seen.items():
        if len(set(keys.values())) > 1:
            desc = ", ".join(f"{n}: {_label(k)}" for n, k in sorted(keys.items()))
            raise LoweringError(f"{parent}: vLLM fuses {'/'.join(group)} into one layer, so "
                                f"they need identical grids (found {desc}); quantize them with "
                                "one bits/group/sym setting")


def _cpu_warnings(packed: dict[str, Packed]) -> None:
    notes = [n for qt in packed.values() for n in vllm_cpu_notes(qt.spec.bits, qt.shape, qt.name)]
    if notes:
        more = f" (+{len(notes) - 3} more)" if len(notes) > 3 else ""
        warnings.warn("vLLM-CPU will not run this folder: " + "; ".join(notes[:3]) + more,
                      stacklevel=3)


def _dense_linears(model: QModel) -> list[str]:
    """Decoder-layer linears kept dense in the IR (2-D passthrough weights of model.layers)."""
    return sorted(module_of(n) for n, a in model.passthrough.items()
                  if n.startswith("model.layers.") and n.endswith(".weight") and a.ndim == 2)


def _quant_config(packed: dict[str, Packed], model: QModel, fmt: str,
                  ct_layout: str) -> dict[str, Any]:
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for name, qt in packed.items():
        groups.setdefault(format_of(qt.spec), []).append(module_of(name))
    dense = _dense_linears(model)
    if fmt == "ct":
        return ct_quantization_config(groups, ["lm_head", *dense], uniform=len(groups) == 1,
                                      layout=ct_layout)
    if len(groups) != 1:
        ex = "; ".join(f"{mods[0]}: {_label(k)}"
                       for k, mods in sorted(groups.items())[:2])
        raise LoweringError(f"GPTQ holds one bits/group/sym setting per model (found "
                            f"{len(groups)}: {ex}); use --format ct for mixed grids")
    return gptq_quantization_config(*next(iter(groups)), skip_modules=dense)


def lower_vllm(model: QModel, out_dir: str | Path, *, fmt: str = "ct", dtype: str = "float16",
               force: bool = False, ct_layout: str = "dense") -> Path:
    """Write ``model`` as a vLLM-loadable Hugging Face folder at ``out_dir``.

    Args:
        fmt: ``"ct"`` (compressed-tensors pack-quantized, 2..8 bits, sym/asym) or ``"gptq"``
            (GPTQ v1, 2/3/4/8 bits).
        dtype: model dtype ``"float16"`` or ``"bfloat16"`` (scales and dense tensors).
        ct_layout: ``"dense"`` (vLLM >= 0.25 / CT >= 0.18) or ``"word"`` (CT <= 0.17 readers);
            they differ only at 3, 5, 6, 7 bits.
    Returns:
        ``out_dir``. When packed linears carry LoRC factors, a PEFT adapter is also written to
        ``adapter_dir(out_dir)`` (``<out_dir>-lora``).
    Raises:
        LoweringError / UnsupportedError naming the tensor the format cannot hold.
    """
    out_dir = Path(out_dir)
    packed, entries = plan_packed(model, fmt, dtype, ct_layout)
    check_fused(packed, set(model.tensors) | set(model.passthrough))
    qcfg = _quant_config(packed, model, fmt, ct_layout)
    _cpu_warnings(packed)
    lora = adapter_dir(out_dir)
    if has_adapter(model) and lora.exists() and not force:
        raise LoweringError(f"{lora}: adapter output exists; pass --force to replace it")
    with atomic_output(out_dir, is_dir=True, force=force) as tmp:
        write_safetensors(model, entries, tmp / "model.safetensors", fmt, dtype, ct_layout)
        cfg = hf_config(model, dtype, qcfg)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if fmt == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        write_tokenizer(model, tmp)
    if has_adapter(model):
        write_peft_adapter(model, lora, base_model_name_or_path=str(out_dir.resolve()),
                           force=force)
    return out_dir


def write_safetensors(model: QModel, entries: dict[str, tuple[str, tuple[int, ...], int]],
                      path: Path, fmt: str, dtype: str, ct_layout: str) -> None:
    """``model.safetensors`` as ``safetensors.save_file`` lays it out (metadata
    ``{"format": "pt"}``), written one QTensor / dense tensor at a time at planned offsets."""
    scale_dtype, tdt = dtype_scale(dtype), TORCH_DTYPES[dtype]
    with OffsetWriter(path, entries, {"format": "pt"}) as w:
        for n in sorted(model.tensors):
            if is_dense_only(n):
                continue
            qt = _retarget(model.tensors[n], fmt, scale_dtype)
            for k, t in _layer_tensors(qt, fmt, tdt, ct_layout).items():
                w.write(k, st_bytes(t))
            del qt                              # before the next one is read
        for n, t in dense_tensors(model, tdt):
            w.write(n, st_bytes(t))
