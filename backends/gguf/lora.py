"""LoRC residual factors as a GGUF LoRA adapter (llama.cpp ``--lora``, ``Llama(lora_path=)``).

llama.cpp computes ``y = W x + scale * b (a x)`` per adapted weight, with ``scale =
adapter_scale * alpha / rank`` (``llama_adapter_lora_weight::get_scale``; rank = ``b.ne[0]``).
A QTensor residual ``A [out, r] @ B [r, in]`` therefore maps to:

| GGUF tensor                     | ggml ne     | numpy shape | IR factor                     |
|---------------------------------|-------------|-------------|-------------------------------|
| ``blk.N.<name>.weight.lora_a``  | ``[in, r]`` | ``[r, in]`` | ``B``                         |
| ``blk.N.<name>.weight.lora_b``  | ``[r, out]``| ``[out, r]``| ``A`` (Q/K rows permuted)     |

Q/K base rows are permuted (``P W``), so the residual becomes ``(P A) B``: only ``A`` is
permuted. Keys: ``general.type = adapter``, ``general.architecture`` = the base model's,
``adapter.type = lora``, ``adapter.lora.alpha = r`` (scale 1) when every residual has the same
rank, else ``0`` (llama.cpp then applies scale 1 to every rank). Factors are written F16 when
the residual's dtype is fp16 (exact), else F32.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from qexport.atomic import atomic_output
from qexport.errors import LoweringError, UnsupportedError
from qexport.ir import QModel

from .names import gguf_arch, hf_to_gguf, permute_rows, rope_heads

__all__ = ["lower_gguf_lora", "lora_tensors"]


def _factor(x: np.ndarray, dtype: str) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "fp16":
        h = a.astype(np.float16)
        if np.array_equal(h.astype(np.float32), a):
            return h
    return a


def lora_tensors(model: QModel) -> list[tuple[str, np.ndarray]]:
    """``(gguf_name, array)`` pairs of the adapter, ``.lora_a`` then ``.lora_b`` per weight."""
    out = []
    for name in sorted(model.tensors):
        res = model.tensors[name].residual
        if res is None:
            continue
        gname = hf_to_gguf(name)
        if gname == "token_embd.weight":
            raise UnsupportedError(f"{name}: a LoRC residual on the token embedding has no "
                                   "GGUF adapter form here (expected residuals on linears)")
        A, B = res.A, res.B
        heads = rope_heads(name, model.config)
        if heads is not None:
            A = permute_rows(A, heads)
        out.append((f"{gname}.lora_a", _factor(B, res.dtype)))
        out.append((f"{gname}.lora_b", _factor(A, res.dtype)))
    return out


def lower_gguf_lora(model: QModel, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the model's LoRC residuals as a GGUF LoRA adapter at ``path`` (atomically).

    Raises:
        LoweringError: the model has no residual factors.
    """
    tensors = lora_tensors(model)
    if not tensors:
        raise LoweringError("no LoRC residuals in the IR: nothing to write as a GGUF adapter "
                            "(expected QTensor.residual on at least one tensor)")
    ranks = {int(arr.shape[0]) for n, arr in tensors if n.endswith(".lora_a")}
    alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0
    arch = gguf_arch(model.config)
    path = Path(path)
    with atomic_output(path, is_dir=False, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            w.add_name(str(model.provenance.get("source") or "qexport") + " LoRC")
            for gname, arr in tensors:
                w.add_tensor(gname, arr)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path
