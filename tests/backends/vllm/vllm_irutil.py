"""Small IRs for the vLLM backend tests: random QTensors on a vLLM spec, and RTN QModels of a tiny
HF folder (fit_minmax + quantize_nearest from qexport.grids, nothing from the backend)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file

from qexport.grids import GridSpec, ZeroDomain, fit_minmax, quantize_nearest, round_to_dtype
from qexport.grids.grid import AffineGrid
from qexport.ir import LowRank, QModel, QTensor

_SKIP_FILES = {"config.json", "model.safetensors"}


def random_qtensor(spec: GridSpec, out_f: int, in_f: int, seed: int = 0,
                   name: str = "model.layers.0.mlp.down_proj.weight") -> QTensor:
    """Random codes, fp16/bf16-representable scales over 6 decades (incl. fp16 subnormals),
    random zeros over the spec's whole zero range (both ends forced to appear)."""
    rng = np.random.default_rng(seed)
    G = spec.n_groups(in_f)
    codes = rng.integers(0, spec.maxq + 1, (out_f, in_f)).astype(np.uint8)
    scales = round_to_dtype(10.0 ** rng.uniform(-6.5, -0.5, (out_f, G)), spec.scale_dtype)
    scales = np.maximum(scales, np.float32(2.0 ** -24)).astype(np.float32)
    zeros = None
    if spec.zero == ZeroDomain.INT:
        lo, hi = spec.zero_range
        zeros = rng.integers(lo, hi + 1, (out_f, G)).astype(np.uint8)
        zeros.flat[0], zeros.flat[-1] = lo, hi
    qt = QTensor(name, codes, AffineGrid(scales=scales, zeros=zeros), spec)
    qt.validate()
    return qt


def rtn_qtensor(name: str, W: np.ndarray, spec: GridSpec, lorc_rank: int = 0) -> QTensor:
    grid = fit_minmax(spec, W)
    qt = QTensor(name, quantize_nearest(spec, grid, W), grid, spec)
    if lorc_rank:
        E = (W - qt.dequantize(with_residual=False)).astype(np.float64)
        U, S, Vt = np.linalg.svd(E, full_matrices=False)
        r = np.sqrt(S[:lorc_rank])
        qt.residual = LowRank(A=round_to_dtype((U[:, :lorc_rank] * r).astype(np.float32), "fp16"),
                              B=round_to_dtype((r[:, None] * Vt[:lorc_rank]).astype(np.float32),
                                               "fp16"), dtype="fp16")
    return qt


def rtn_qmodel(hf_dir: Path, spec_of: Callable[[str], GridSpec | None], *,
               lorc_rank: int = 0) -> QModel:
    """Every weight for which ``spec_of(name)`` gives a spec is RTN-quantized onto it."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.astype(np.float32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    tensors, passthrough = {}, {}
    for name, W in sorted(sd.items()):
        spec = spec_of(name) if W.ndim == 2 else None
        if spec is not None:
            tensors[name] = rtn_qtensor(name, W, spec, lorc_rank)
        else:
            passthrough[name] = W
    tok = {f.name: f.read_bytes() for f in hf_dir.iterdir()
           if f.is_file() and f.name not in _SKIP_FILES}
    model = QModel(config=config, tensors=tensors, passthrough=passthrough, tokenizer=tok,
                   provenance={"method": "rtn"})
    model.validate()
    return model


def projections(spec: GridSpec) -> Callable[[str], GridSpec | None]:
    """spec_of for "every *_proj.weight onto ``spec``"."""
    return lambda name: spec if name.endswith("_proj.weight") else None
