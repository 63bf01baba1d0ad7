"""int32 word packing of unsigned codes, shared by GPTQ and compressed-tensors (numpy only).

Two layouts of ``n`` codes of ``b`` bits along the packed axis:

| layout  | code ``i`` sits at                                | words              | written by |
|---------|---------------------------------------------------|--------------------|------------|
| dense   | global bit ``i*b`` of a little-endian stream of int32 words, split across words when needed | ``ceil(n*b/32)`` | AutoGPTQ (2/3/4/8), CT >= 0.18; vLLM >= 0.25 allocates this |
| word    | bit ``(i % k)*b`` of word ``i // k``, ``k = 32 // b``, high bits zero | ``ceil(n/k)`` | CT <= 0.17 |

For ``b`` in 1, 2, 4, 8 the two are identical. GPTQ's 3-bit "32 values in 3 words" is the dense
stream. GPTQ ``qweight`` is ``pack(codes.T)`` along ``in`` (dim 0 of ``[in, out]``); CT
``weight_packed`` is ``pack(codes)`` along ``in`` (dim 1 of ``[out, in]``).
"""
from __future__ import annotations

import numpy as np

from qexport.errors import LoweringError, VerifyError
from qexport.grids import pack_bits, unpack_bits

__all__ = ["LAYOUTS", "n_words", "pack_words", "unpack_words", "pack_axis0", "unpack_axis0"]

LAYOUTS = ("dense", "word")


def _check(bits: int, layout: str) -> None:
    if not 1 <= bits <= 8:
        raise LoweringError(f"word packing: bits expected in 1..8 (not {bits})")
    if layout not in LAYOUTS:
        raise LoweringError(f"word packing: layout expected one of {list(LAYOUTS)} "
                            f"(not {layout!r})")


def n_words(n: int, bits: int, layout: str = "dense") -> int:
    """int32 words holding ``n`` codes of ``bits`` bits."""
    _check(bits, layout)
    if layout == "dense":
        return -(-n * bits // 32)
    return -(-n // (32 // bits))


def pack_words(codes: np.ndarray, bits: int, layout: str = "dense") -> np.ndarray:
    """Pack the last axis: uint8 ``[rows, n]`` (values < 2**bits) -> int32 ``[rows, W]``."""
    _check(bits, layout)
    codes = np.ascontiguousarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise LoweringError(f"word packing: codes expected 2-D uint8 (not {codes.ndim}-D "
                            f"{codes.dtype})")
    rows, n = codes.shape
    nw = n_words(n, bits, layout)
    if layout == "dense":
        by = pack_bits(codes, bits)                                   # [rows, ceil(n*b/8)]
        by = np.pad(by, ((0, 0), (0, 4 * nw - by.shape[1])))
        return np.ascontiguousarray(by).view("<u4").astype(np.uint32).view(np.int32)
    if codes.size and int(codes.max()) >= 2 ** bits:
        raise LoweringError(f"word packing: code {int(codes.max())} does not fit in {bits} bits")
    k = 32 // bits
    padded = np.pad(codes, ((0, 0), (0, nw * k - n))).reshape(rows, nw, k).astype(np.uint32)
    shifts = (np.arange(k, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(padded << shifts, axis=2).astype(np.uint32).view(np.int32)


def unpack_words(words: np.ndarray, bits: int, n: int, layout: str = "dense") -> np.ndarray:
    """Inverse of :func:`pack_words`: int32 ``[rows, W]`` -> uint8 ``[rows, n]``.

    Raises VerifyError when ``W`` is not exactly the word count ``n`` codes need.
    """
    _check(bits, layout)
    words = np.ascontiguousarray(words)
    if words.dtype != np.int32 or words.ndim != 2:
        raise VerifyError(f"word unpacking: expected 2-D int32 words (not {words.ndim}-D "
                          f"{words.dtype})")
    rows, nw = words.shape
    if nw != n_words(n, bits, layout):
        raise VerifyError(f"word unpacking: expected {n_words(n, bits, layout)} words for {n} "
                          f"codes of {bits} bits ({layout} layout), not {nw}")
    u = words.view(np.uint32)
    if layout == "dense":
        by = u.astype("<u4").view(np.uint8).reshape(rows, 4 * nw)
        return unpack_bits(by, bits, n)
    k = 32 // bits
    shifts = np.arange(k, dtype=np.uint32) * bits
    vals = (u[:, :, None] >> shifts) & np.uint32(2 ** bits - 1)
    return vals.reshape(rows, nw * k)[:, :n].astype(np.uint8)


def pack_axis0(codes: np.ndarray, bits: int, layout: str = "dense") -> np.ndarray:
    """Pack along dim 0: uint8 ``[n, cols]`` -> int32 ``[W, cols]`` (GPTQ qweight, CT zero
    points)."""
    return np.ascontiguousarray(pack_words(np.ascontiguousarray(codes.T), bits, layout).T)


def unpack_axis0(words: np.ndarray, bits: int, n: int, layout: str = "dense") -> np.ndarray:
    """Inverse of :func:`pack_axis0`: int32 ``[W, cols]`` -> uint8 ``[n, cols]``."""
    return np.ascontiguousarray(unpack_words(np.ascontiguousarray(words.T), bits, n, layout).T)
