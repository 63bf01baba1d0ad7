"""``lower_onnx``: QModel -> ONNX folder (model.onnx + model.onnx.data + genai_config.json +
tokenizer files + qexport_onnx.json), written atomically.

| file                 | content                                                           |
|----------------------|-------------------------------------------------------------------|
| ``model.onnx``       | the decoder graph (graph.py), opset 18 + com.microsoft 1           |
| ``model.onnx.data``  | every initializer over 1 KiB (external data, so > 2 GB models work) |
| ``genai_config.json``| onnxruntime-genai config matching the graph's I/O names            |
| tokenizer files      | copied byte for byte from the IR                                   |
| ``qexport_onnx.json``| what was lowered: dtype, accuracy_level, each quantized tensor's spec |
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx

from qexport.atomic import atomic_output
from qexport.errors import IRError, LoweringError
from qexport.ir import QModel
from qexport.irstream import tensor_meta

from .arch import decoder_config
from .genai import DATA_FILE, MODEL_FILE, write_genai_files
from .graph import build_decoder

__all__ = ["lower_onnx", "MANIFEST_FILE"]

MANIFEST_FILE = "qexport_onnx.json"


def _quant_entry(model: QModel, name: str) -> dict[str, Any]:
    spec, shape, has_res = tensor_meta(model.tensors, name)
    rank = model.tensors[name].residual.rank if has_res else 0      # read only with LoRC
    return {"spec": spec.name, "shape": list(shape), "residual_rank": rank}


def _manifest(model: QModel, dtype: str, accuracy_level: int, proto: onnx.ModelProto,
              files: list[str]) -> dict[str, Any]:
    meta = {p.key: p.value for p in proto.metadata_props}
    return {"format": "qexport-onnx", "version": 1, "dtype": dtype,
            "accuracy_level": accuracy_level, "architecture": model.architecture,
            "min_onnxruntime": meta.get("qexport.min_onnxruntime"),
            "quantized": {n: _quant_entry(model, n) for n in sorted(model.tensors)},
            "files": sorted([MODEL_FILE, DATA_FILE, MANIFEST_FILE] + files)}


def lower_onnx(model: QModel, out_dir: str | os.PathLike, *, dtype: str = "fp32",
               accuracy_level: int = 0, force: bool = False) -> Path:
    """Write ``model`` as an onnxruntime / onnxruntime-genai folder at ``out_dir``.

    Args:
        dtype: "fp32" (the CPU graph) or "fp16" (the CUDA graph; genai_config asks for CUDA).
        accuracy_level: MatMulNBits ``accuracy_level`` on every node; 0 (default) and 1 compute
            in fp32 and are exact on CPU, 4 quantizes activations to int8 (faster, lossy).
        force: replace an existing ``out_dir``.
    Returns the folder path. Raises UnsupportedError / LoweringError (nothing written) when a
    tensor cannot be held exactly.
    """
    try:
        model.validate()
    except IRError as e:
        raise LoweringError(f"IR invalid, not lowered: {e}") from e
    dc = decoder_config(model.config)
    out = Path(out_dir)
    with atomic_output(out, is_dir=True, force=force) as tmp:
        # large initializers go to model.onnx.data as the graph is built (one weight in memory)
        with open(tmp / DATA_FILE, "wb") as data:
            proto = build_decoder(model, dtype, accuracy_level, external=(data, DATA_FILE))
        onnx.save_model(proto, str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        files = write_genai_files(tmp, model, dc, cuda=dtype == "fp16")
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(_manifest(model, dtype, accuracy_level, proto, files), indent=2) + "\n")
        _umask_modes(tmp)
    return out


def _umask_modes(folder: Path) -> None:
    """Give the temp folder (mkdtemp: 0700) and files (external data: 0600) the modes a plain
    mkdir / open would have had, so another user's runtime can read the artifact."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)
