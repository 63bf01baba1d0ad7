"""Everything of a served Hugging Face folder except the packed linears.

| file                      | content                                                              |
|---------------------------|----------------------------------------------------------------------|
| ``config.json``           | the IR's config + ``torch_dtype``/``dtype`` + ``quantization_config`` |
| ``model.safetensors``     | packed linears + dense tensors (embeddings, norms, lm_head, biases) in the model dtype; metadata ``{"format": "pt"}`` |
| tokenizer files           | copied byte for byte from the IR (``QModel.tokenizer``)               |
| ``generation_config.json``| the IR's, else bos/eos/pad ids from the config                        |

Dense tensors are the IR's float32 values cast (round to nearest even) to the model dtype; a
value that overflows it is refused. A tied ``lm_head`` is not written (vLLM and transformers tie
it to ``embed_tokens``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import LoweringError, NumericsError
from qexport.ir import QModel

__all__ = ["TORCH_DTYPES", "module_of", "is_dense_only", "dense_tensor", "dense_tensors",
           "hf_config", "write_tokenizer", "save_safetensors", "HF_TOKENIZER_FILES"]

TORCH_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: IR tokenizer entries that are not Hugging Face tokenizer files (GGUF vocab dumps)
_NON_HF_PREFIX = "gguf"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def module_of(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def is_dense_only(name: str) -> bool:
    """Tensors vLLM's formats never hold quantized here: embeddings and the lm_head."""
    return name.endswith("embed_tokens.weight") or name == "lm_head.weight"


def dense_tensor(name: str, value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``value`` cast to ``dtype``; NumericsError if a finite value overflows."""
    t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(dtype)
    if not bool(torch.isfinite(t).all()) and bool(np.isfinite(value).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NumericsError(f"{name}: {bad} values overflow {dtype} (max |x| "
                            f"{float(np.abs(value).max()):.4g}); expected values within the "
                            "model dtype's range (use --dtype bfloat16)")
    return t


def _tied(config: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def dense_tensors(model: QModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Passthrough tensors plus quantized embeddings / lm_head written as their IR value
    (``dequantize() + residual``), all cast to ``dtype``; a tied lm_head is dropped."""
    values: dict[str, np.ndarray] = dict(model.passthrough)
    for name, qt in model.tensors.items():
        if is_dense_only(name):
            values[name] = qt.dequantize(with_residual=True)
    if _tied(model.config) and "lm_head.weight" in values:
        emb = next((v for k, v in values.items() if k.endswith("embed_tokens.weight")), None)
        if emb is None or not np.array_equal(emb, values["lm_head.weight"]):
            raise LoweringError("lm_head.weight: config says tie_word_embeddings but the IR's "
                                "lm_head differs from embed_tokens; expected equal tensors "
                                "(or tie_word_embeddings false)")
        del values["lm_head.weight"]
    return {n: dense_tensor(n, v, dtype) for n, v in sorted(values.items())}


def hf_config(model: QModel, dtype: str, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The IR's config with the model dtype and ``quantization_config`` set."""
    cfg = {k: v for k, v in model.config.items() if k != "quantization_config"}
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    cfg["quantization_config"] = quantization_config
    return cfg


def _generation_config(model: QModel) -> bytes:
    if "generation_config.json" in model.tokenizer:
        return model.tokenizer["generation_config.json"]
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    gen = {k: model.config[k] for k in keys if model.config.get(k) is not None}
    gen["_from_model_config"] = True
    return (json.dumps(gen, indent=2) + "\n").encode()


def write_tokenizer(model: QModel, folder: Path) -> list[str]:
    """Copy the IR's tokenizer files and write generation_config.json; returns file names."""
    names = []
    for fname, data in sorted(model.tokenizer.items()):
        if fname.startswith(_NON_HF_PREFIX) or "/" in fname:
            continue
        (folder / fname).write_bytes(data)
        names.append(fname)
    if not any(f in names for f in HF_TOKENIZER_FILES):
        warnings.warn(f"{folder.name}: the IR has no Hugging Face tokenizer file "
                      f"({' or '.join(HF_TOKENIZER_FILES)}); pass tokenizer=... to vLLM",
                      stacklevel=3)
    (folder / "generation_config.json").write_bytes(_generation_config(model))
    return names + ["generation_config.json"]


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
