"""GGUF backend (llama.cpp): spec table, block packers, reference decoder, llama.cpp quantizers.

Block-level API (this package's core; the whole-model writer, names, recipes and verify live in
sibling modules):

- ``types``: ``GGUF_TYPES``, ``gguf_type(name)``, ``spec_for(name)``, ``type_for_spec(spec)``.
- ``pack``: ``pack_tensor(codes, grid, spec, name)`` -> uint8 ``[out, row_bytes]``.
- ``decode``: ``unpack_tensor(raw, type, shape)`` -> (codes, grid); ``dequantize_raw``.
- ``llamacpp_quants``: ``llamacpp_quantize(W, type, imatrix=None)`` -> (codes, grid), the IR
  llama.cpp's own quantizer would store.
"""
from .decode import dequantize_raw, unpack_tensor
from .llamacpp_quants import llamacpp_quantize
from .pack import pack_tensor
from .types import GGUF_TYPES, GGUFType, gguf_type, spec_for, type_for_spec

__all__ = ["GGUF_TYPES", "GGUFType", "gguf_type", "spec_for", "type_for_spec", "pack_tensor",
           "unpack_tensor", "dequantize_raw", "llamacpp_quantize"]
