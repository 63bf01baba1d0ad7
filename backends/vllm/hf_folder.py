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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import LoweringError, NumericsError
from qexport.ir import QModel

__all__ = ["TORCH_DTYPES", "module_of", "is_dense_only", "dense_tensor", "dense_tensors",
           "dense_names", "st_entry", "st_bytes", "hf_config", "write_tokenizer",
           "save_safetensors", "HF_TOKENIZER_FILES"]

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


def dense_names(model: QModel) -> list[str]:
    """Names of the dense tensors written, sorted: passthrough tensors plus quantized
    embeddings / lm_head (written as their IR value); a tied lm_head is dropped (checked equal
    to ``embed_tokens`` when both are in the IR)."""
    names = set(model.passthrough) | {n for n in model.tensors if is_dense_only(n)}
    if _tied(model.config) and "lm_head.weight" in names:
        emb = next((n for n in sorted(names) if n.endswith("embed_tokens.weight")), None)
        if emb is None or not np.array_equal(_dense_value(model, emb),
                                             _dense_value(model, "lm_head.weight")):
            raise LoweringError("lm_head.weight: config says tie_word_embeddings but the IR's "
                                "lm_head differs from embed_tokens; expected equal tensors "
                                "(or tie_word_embeddings false)")
        names.discard("lm_head.weight")
    return sorted(names)


def _dense_value(model: QModel, name: str) -> np.ndarray:
    if name in model.passthrough:
        return model.passthrough[name]
    return model.tensors[name].dequantize(with_residual=True)


def dense_tensors(model: QModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor cast to dtype)`` of every :func:`dense_names` entry, one at a time."""
    for n in dense_names(model):
        yield n, dense_tensor(n, _dense_value(model, n), dtype)


_ST_NAME = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
            torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8",
            torch.int16: "I16"}


def st_entry(t: torch.Tensor) -> tuple[str, tuple[int, ...], int]:
    """``(safetensors dtype, shape, nbytes)`` of a torch tensor."""
    return _ST_NAME[t.dtype], tuple(t.shape), t.numel() * t.element_size()


def st_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``t`` as a uint8 array (any dtype, bf16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


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
