"""qexport.backends.onnx: decoder graphs with ``com.microsoft::MatMulNBits`` for onnxruntime
(CPU and CUDA EPs) and onnxruntime-genai.

Public API:

- ``mnb_spec(bits, block_size, sym, scale_dtype="fp16") -> GridSpec``: the grid to quantize onto.
- ``lower_onnx(model, out_dir, *, dtype="fp32"|"fp16", accuracy_level=0, force=False) -> Path``.
- ``verify_onnx(folder, model, *, device="auto") -> VerifyReport``.
- ``pack_qtensor`` / ``decode_mnb``: the packer and its independent reference decoder.
- ``OnnxDecoder(path, device)``: run an exported folder with plain onnxruntime.
- ``supported_formats()``: which (bits, block_size, sym) the installed onnxruntime computes
  exactly on the CPU EP (probed once).

Non-uniform codebooks (CodebookGrid specs), k-quant super-blocks and float-min affine grids are
refused with UnsupportedError: MatMulNBits has no value table, and a standard-op lookup
(Gather from a per-row table) would be constant-folded by onnxruntime into a full fp32 weight
at session load (see shared/docs/onnx-matmulnbits.md section 5), defeating the export. Quantize
onto ``mnb_spec(...)``, or keep such tensors unquantized, or export them to GGUF instead.
"""
from .decode import decode_mnb, decode_mnb_codes, decode_mnb_zero_points
from .graph import build_decoder
from .lower import lower_onnx
from .pack import MnbWeights, pack_arrays, pack_qtensor
from .probe import supported_formats
from .runner import OnnxDecoder, reference_logits, reference_model
from .session import cuda_available, make_session
from .specs import MNB_BITS, MNB_BLOCK_SIZES, MnbFormat, mnb_format_of, mnb_name, mnb_spec
from .verify import VerifyReport, verify_onnx

__all__ = [
    "MNB_BITS", "MNB_BLOCK_SIZES", "MnbFormat", "MnbWeights", "OnnxDecoder", "VerifyReport",
    "build_decoder", "cuda_available", "decode_mnb", "decode_mnb_codes", "decode_mnb_zero_points",
    "lower_onnx", "make_session", "mnb_format_of", "mnb_name", "mnb_spec", "pack_arrays",
    "pack_qtensor", "reference_logits", "reference_model", "supported_formats", "verify_onnx",
]
