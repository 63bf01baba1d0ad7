"""compressed-tensors ``pack-quantized``: per-layer tensors and ``quantization_config``.

Per quantized linear ``prefix`` (``W [out, in]``, ``G`` groups, ``b`` bits, IR codes ``u`` in
``0 .. 2**b-1`` and zeros ``z``):

| tensor                      | dtype       | shape                    | content                          |
|-----------------------------|-------------|--------------------------|----------------------------------|
| ``prefix.weight_packed``    | int32       | ``[out, W(in)]``          | ``pack(u)`` along ``in``          |
| ``prefix.weight_scale``     | model dtype | ``[out, G]``              | scales                           |
| ``prefix.weight_shape``     | int64       | ``[2]``                   | ``(out, in)``                    |
| ``prefix.weight_zero_point``| int32       | ``[W(out), G]``           | ``pack(z)`` along ``out`` (asym) |

compressed-tensors stores the *signed* code ``q = u - 2**(b-1)`` shifted back by ``+2**(b-1)``
for packing (and likewise the signed zero point), so the stored fields are exactly the IR's
unsigned ``u`` and ``z``; its value ``(q - zp) * s`` equals the IR's ``s * (u - z)``.
``W(n)`` is the word count of the layout (bitstream.py): ``dense`` (vLLM >= 0.25, CT >= 0.18)
by default; ``word`` reproduces CT <= 0.17's packer (differs only at 3, 5, 6, 7 bits).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qexport.ir import QTensor

from .bitstream import pack_axis0, pack_words

__all__ = ["ct_layer_tensors", "ct_quantization_config", "ct_weights_args", "CT_VERSION_OF"]

#: ``version`` written in quantization_config: the oldest compressed-tensors whose packer writes
#: the folder's layout. Both layouts are 0.17.0's (the version vLLM 0.32 pins) unless a 3/5/6/7-bit
#: group is packed dense, which CT writes from 0.18.0 on.
CT_VERSION_OF = {"word": "0.17.0", "dense": "0.18.0"}
_ODD_BITS = (3, 5, 6, 7)


def ct_layer_tensors(qt: QTensor, prefix: str, dtype: torch.dtype,
                     layout: str = "dense") -> dict[str, torch.Tensor]:
    """The CT tensors of one quantized linear (module name ``prefix``); see the module table."""
    spec = qt.spec
    out_f, in_f = qt.shape
    t = {
        f"{prefix}.weight_packed": torch.from_numpy(pack_words(qt.codes, spec.bits, layout)),
        f"{prefix}.weight_scale": torch.from_numpy(np.ascontiguousarray(qt.grid.scales)).to(dtype),
        f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if qt.grid.zeros is not None:
        t[f"{prefix}.weight_zero_point"] = torch.from_numpy(
            pack_axis0(qt.grid.zeros, spec.bits, layout))
    return t


def ct_weights_args(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """CT ``QuantizationArgs`` of a weight-only integer grid (as ``model_dump`` writes it)."""
    return {"num_bits": bits, "type": "int", "symmetric": sym,
            "group_size": None if group_size == -1 else group_size,
            "strategy": "channel" if group_size == -1 else "group",
            "block_structure": None, "dynamic": False, "actorder": None,
            "scale_dtype": None, "zp_dtype": None if sym else "torch.int8",
            "observer": "minmax", "observer_kwargs": {}}


def ct_quantization_config(groups: dict[tuple[int, int, bool], list[str]], ignore: list[str],
                           *, uniform: bool, layout: str = "dense") -> dict[str, Any]:
    """``config.json["quantization_config"]`` for CT pack-quantized.

    Args:
        groups: ``(bits, group_size, sym)`` -> module names quantized that way.
        ignore: module names left unquantized (``lm_head``, any dense linear).
        uniform: one group targeting class ``Linear`` (llm-compressor's form) instead of
            explicit module names (needed when grids differ between modules).
    """
    odd = any(key[0] in _ODD_BITS for key in groups)
    version = CT_VERSION_OF[layout if odd else "word"]
    config_groups = {}
    for i, (key, modules) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if uniform else sorted(modules),
            "weights": ct_weights_args(*key), "input_activations": None,
            "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "version": version,
            "config_groups": config_groups, "ignore": sorted(ignore),
            "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}}
