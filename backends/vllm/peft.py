"""LoRC residual factors as a PEFT LoRA adapter folder (vLLM ``--enable-lora``, peft).

PEFT computes ``y = W x + (lora_alpha / r) * lora_B(lora_A(x))``. With ``lora_alpha = r`` the
scaling is 1, so storing the IR's factors as

| PEFT tensor                                             | shape      | IR factor |
|---------------------------------------------------------|------------|-----------|
| ``base_model.model.<module>.lora_A.weight``              | ``[r, in]`` | ``B``     |
| ``base_model.model.<module>.lora_B.weight``              | ``[out, r]``| ``A``     |

gives ``y = dequant(Q) x + A (B x)``: the IR's value. Factors keep the IR's dtype (fp16 / bf16 /
fp32), so their values are exact. Mixed ranks use PEFT's ``rank_pattern``/``alpha_pattern``.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.atomic import atomic_output
from qexport.ir import QModel
from qexport.irstream import tensor_meta

from .hf_folder import is_dense_only, module_of, save_safetensors

__all__ = ["adapter_dir", "has_adapter", "peft_tensors", "peft_config", "write_peft_adapter",
           "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
_FACTOR_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def adapter_dir(model_dir: str | Path) -> Path:
    """Where the adapter of a model folder goes: a sibling ``<name>-lora``."""
    p = Path(model_dir)
    return p.with_name(p.name + "-lora")


def has_adapter(model: QModel) -> bool:
    """True when some packed linear carries LoRC factors."""
    return any(tensor_meta(model.tensors, n)[2] for n in model.tensors if not is_dense_only(n))


def peft_tensors(model: QModel) -> dict[str, torch.Tensor]:
    """``lora_A`` / ``lora_B`` weights of every packed linear with a residual."""
    out = {}
    for name in sorted(model.tensors):
        if is_dense_only(name) or not tensor_meta(model.tensors, name)[2]:
            continue
        qt = model.tensors[name]
        dt = _FACTOR_DTYPES[qt.residual.dtype]
        key = PEFT_PREFIX + module_of(name)
        out[f"{key}.lora_A.weight"] = torch.from_numpy(
            np.ascontiguousarray(qt.residual.B, dtype=np.float32)).to(dt)
        out[f"{key}.lora_B.weight"] = torch.from_numpy(
            np.ascontiguousarray(qt.residual.A, dtype=np.float32)).to(dt)
    return out


def peft_config(model: QModel, base_model_name_or_path: str) -> dict[str, Any]:
    """``adapter_config.json``: rank, alpha = rank, target module suffixes."""
    ranks = {module_of(n): qt.residual.rank for n, qt in model.tensors.items()
             if qt.residual is not None and not is_dense_only(n)}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path":
            base_model_name_or_path, "r": r, "lora_alpha": r, "target_modules": targets,
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "layers_to_transform": None, "layers_pattern": None}


def write_peft_adapter(model: QModel, out: str | Path, *, base_model_name_or_path: str,
                       force: bool = False) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` at ``out`` (atomic)."""
    out = Path(out)
    with atomic_output(out, is_dir=True, force=force) as tmp:
        save_safetensors(peft_tensors(model), tmp / "adapter_model.safetensors")
        cfg = peft_config(model, base_model_name_or_path)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
