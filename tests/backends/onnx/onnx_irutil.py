"""Build small IRs for the ONNX backend tests: RTN (fit_minmax + quantize_nearest) of a tiny HF
folder onto a MatMulNBits spec, optionally with quantized embeddings / lm_head and LoRC factors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from qexport.grids import GridSpec, fit_minmax, quantize_nearest, round_to_dtype
from qexport.ir import LowRank, QModel, QTensor

_SKIP_FILES = {"config.json", "model.safetensors"}


def rtn_qtensor(name: str, W: np.ndarray, spec: GridSpec, lorc_rank: int = 0) -> QTensor:
    grid = fit_minmax(spec, W)
    codes = quantize_nearest(spec, grid, W)
    qt = QTensor(name, codes, grid, spec)
    if lorc_rank:      # random fp16 factors: the backend must carry any A, B exactly (no SVD)
        rng = np.random.default_rng(W.shape[0] * 7 + W.shape[1])
        A = round_to_dtype(rng.normal(0, 0.05, (W.shape[0], lorc_rank)).astype(np.float32), "fp16")
        B = round_to_dtype(rng.normal(0, 0.05, (lorc_rank, W.shape[1])).astype(np.float32), "fp16")
        qt.residual = LowRank(A=A, B=B, dtype="fp16")
    return qt


def rtn_qmodel(hf_dir: Path, spec: GridSpec, *, quant_embed: bool = False,
               quant_head: bool = False, lorc_rank: int = 0) -> QModel:
    """Every ``*_proj.weight`` quantized with RTN onto ``spec`` (plus embed / lm_head if asked)."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.astype(np.float32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    tensors, passthrough = {}, {}
    for name, W in sorted(sd.items()):
        q = (W.ndim == 2 and name.endswith("_proj.weight")) \
            or (quant_embed and name == "model.embed_tokens.weight") \
            or (quant_head and name == "lm_head.weight")
        if q:
            tensors[name] = rtn_qtensor(name, W, spec, lorc_rank)
        else:
            passthrough[name] = W
    tok = {f.name: f.read_bytes() for f in hf_dir.iterdir()
           if f.is_file() and f.name not in _SKIP_FILES}
    model = QModel(config=config, tensors=tensors, passthrough=passthrough, tokenizer=tok,
                   provenance={"method": "rtn", "spec": spec.name})
    model.validate()
    return model
