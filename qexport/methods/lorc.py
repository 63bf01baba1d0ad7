"""LoRC (ZeroQuant-V2): low-rank compensation of the quantization error.

``W - dequant(Q) ~= A @ B`` with the rank-r truncated SVD of the error, split symmetrically
(``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``) so both factors have balanced ranges, then
rounded to the storage dtype. ``W`` is the original weight in original column order.
"""
from __future__ import annotations

import numpy as np

from qexport.errors import InputError
from qexport.grids import round_to_dtype
from qexport.ir import LowRank

__all__ = ["lorc_factors"]


def lorc_factors(W: np.ndarray, Wq: np.ndarray, rank: int, dtype: str = "fp16") -> LowRank:
    """Rank-``rank`` factors of ``W - Wq`` (both float32 ``[out, in]``).

    Returns:
        LowRank with A float32 ``[out, r]`` and B float32 ``[r, in]`` representable in dtype.
    """
    out_f, in_f = W.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise InputError(f"LoRC rank expected in 1..{min(out_f, in_f)} (not {rank})")
    E = np.asarray(W, dtype=np.float64) - np.asarray(Wq, dtype=np.float64)
    U, S, Vt = np.linalg.svd(E, full_matrices=False)
    r = np.sqrt(S[:rank])
    A = (U[:, :rank] * r).astype(np.float32)
    B = (r[:, None] * Vt[:rank]).astype(np.float32)
    return LowRank(round_to_dtype(A, dtype), round_to_dtype(B, dtype), dtype)
