"""Pack a QTensor's exact codes / scales / zeros into MatMulNBits initializers (see specs.py).

Nothing is re-rounded: codes are copied bit for bit, scales are cast to the graph dtype only
after checking every value is representable in it, zero points are copied. The ragged tail of K
(when ``block_size`` does not divide it) is padded with the block's own zero code, so padding
decodes to exactly 0 (onnxruntime ignores it anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qexport.errors import LoweringError
from qexport.grids import AffineGrid, GridError, check_representable, pack_bits
from qexport.ir import QTensor

from .specs import MnbFormat, mnb_format_of

__all__ = ["MnbWeights", "GRAPH_DTYPES", "pack_codes", "pack_zero_points", "pack_qtensor",
           "pack_arrays"]

#: graph dtype name -> (numpy dtype of float initializers, scale dtype name for check_representable)
GRAPH_DTYPES: dict[str, tuple[type, str]] = {"fp32": (np.float32, "fp32"),
                                             "fp16": (np.float16, "fp16")}


@dataclass
class MnbWeights:
    """The initializers and attributes of one MatMulNBits node.

    Attributes:
        B: uint8 ``[N, k_blocks, blob_size]``.
        scales: float32 or float16 ``[N, k_blocks]`` (the graph dtype).
        zero_points: uint8 ``[N, ceil(k_blocks * bits / 8)]``, or None (symmetric).
        K, N: input / output features.
        fmt: bits, block_size, sym.
    """

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    K: int
    N: int
    fmt: MnbFormat

    @property
    def k_blocks(self) -> int:
        return -(-self.K // self.fmt.block_size)

    def attrs(self, accuracy_level: int) -> dict[str, int]:
        return {"K": self.K, "N": self.N, "bits": self.fmt.bits,
                "block_size": self.fmt.block_size, "accuracy_level": accuracy_level}


def pack_codes(codes: np.ndarray, fmt: MnbFormat, pad_codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[N, K]`` -> ``B`` uint8 ``[N, k_blocks, blob_size]``.

    ``pad_codes`` uint8 ``[N]``: the code written into the padded tail of each row.
    """
    N, K = codes.shape
    bs = fmt.block_size
    kb = -(-K // bs)
    full = np.empty((N, kb * bs), dtype=np.uint8)
    full[:, :K] = codes
    full[:, K:] = pad_codes[:, None]
    return pack_bits(full.reshape(N, kb, bs), fmt.bits)


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """uint8 zeros ``[N, k_blocks]`` -> uint8 ``[N, ceil(k_blocks * bits / 8)]`` (same order)."""
    return pack_bits(np.ascontiguousarray(zeros, dtype=np.uint8), bits)


def _scales_in(scales: np.ndarray, dtype: str, tensor: str) -> np.ndarray:
    np_dtype, check_name = GRAPH_DTYPES[dtype]
    try:
        check_representable(scales, check_name, f"{tensor}.scales")
    except GridError as e:
        raise LoweringError(f"{e}; the {dtype} graph stores MatMulNBits scales as {dtype}") from e
    return np.ascontiguousarray(scales, dtype=np.float32).astype(np_dtype)


def pack_arrays(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                fmt: MnbFormat, dtype: str = "fp32", tensor: str = "tensor") -> MnbWeights:
    """Pack raw arrays (codes uint8 ``[N, K]``, scales float32 ``[N, k_blocks]``, zeros uint8
    ``[N, k_blocks]`` or None for symmetric) into MatMulNBits initializers."""
    if dtype not in GRAPH_DTYPES:
        raise LoweringError(f"{tensor}: graph dtype expected one of {sorted(GRAPH_DTYPES)} "
                            f"(not {dtype!r})")
    N, K = codes.shape
    kb = -(-K // fmt.block_size)
    if scales.shape != (N, kb):
        raise LoweringError(f"{tensor}.scales: expected shape {[N, kb]} (not {list(scales.shape)})")
    if fmt.sym != (zeros is None):
        raise LoweringError(f"{tensor}: {'symmetric' if fmt.sym else 'asymmetric'} format "
                            f"expected {'no zeros' if fmt.sym else 'zeros'}")
    if zeros is None:
        pad = np.full(N, fmt.implicit_zero, dtype=np.uint8)
        zp = None
    else:
        if zeros.shape != (N, kb):
            raise LoweringError(f"{tensor}.zeros: expected shape {[N, kb]} "
                                f"(not {list(zeros.shape)})")
        pad = zeros[:, -1].astype(np.uint8)
        zp = pack_zero_points(zeros, fmt.bits)
    B = pack_codes(codes, fmt, pad)
    return MnbWeights(B=B, scales=_scales_in(scales, dtype, tensor), zero_points=zp, K=K, N=N,
                      fmt=fmt)


def pack_qtensor(qt: QTensor, dtype: str = "fp32") -> MnbWeights:
    """Pack one QTensor (affine grid on an mnb-compatible spec) for a ``dtype`` graph.

    Raises UnsupportedError / LoweringError naming the tensor when it cannot be held exactly.
    The residual (LoRC) is not part of MatMulNBits: see graph.py.
    """
    fmt = mnb_format_of(qt.spec, qt.name)
    if not isinstance(qt.grid, AffineGrid):
        raise LoweringError(f"{qt.name}: expected an AffineGrid (not {type(qt.grid).__name__})")
    return pack_arrays(qt.codes, qt.grid.scales, qt.grid.zeros, fmt, dtype, qt.name)
