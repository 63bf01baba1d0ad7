"""LoRC (ZeroQuant-V2): low-rank compensation of the quantization error.

``W - dequant(Q) ~= A @ B`` with the rank-r truncated SVD of the error, split symmetrically
(``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``) so both factors have balanced ranges, then
rounded to the storage dtype. ``W`` is the original weight in original column order.

``weight="hessian"`` (qexport's option, not the paper's): the rank-r ``M`` minimising the
layer-output error ``tr((E - M) H (E - M)^T)`` for the input Hessian ``H = 2/N X^T X`` instead
of ``||E - M||_F``: with ``H + damp I = L L^T`` (Cholesky), the truncated SVD of ``E L`` gives
``M = U_r S_r V_r^T L^-1`` (the same Eckart-Young argument in the ``L``-weighted norm).
"""
from __future__ import annotations

import numpy as np

from qexport.errors import InputError, NumericsError
from qexport.grids import round_to_dtype
from qexport.ir import LowRank

__all__ = ["LORC_WEIGHTS", "lorc_factors"]

#: how the error is measured: "none" = Frobenius (ZeroQuant-V2), "hessian" = layer output
LORC_WEIGHTS = ("none", "hessian")


def _cholesky_lower(H: np.ndarray, in_f: int, percdamp: float) -> np.ndarray:
    """``L`` with ``L L^T = H + percdamp * mean(diag H) * I`` (float64 ``[in, in]``)."""
    H = np.asarray(H, dtype=np.float64)
    if H.shape != (in_f, in_f):
        raise InputError(f"LoRC Hessian expected shape [{in_f}, {in_f}] (not {list(H.shape)})")
    if not np.isfinite(H).all():
        raise NumericsError("LoRC Hessian expected finite values (found non-finite)")
    d = np.diag(H)
    damp = percdamp * float(d.mean()) if d.mean() > 0 else 1.0
    Hd = (H + H.T) / 2 + damp * np.eye(in_f)
    dead = d <= 0                              # columns no calibration input reaches
    Hd[dead, dead] = max(damp, 1e-12)
    try:
        return np.linalg.cholesky(Hd)
    except np.linalg.LinAlgError as e:
        raise NumericsError(f"LoRC Hessian is not positive definite after dampening "
                            f"{percdamp} (expected a Gram matrix of inputs): {e}") from e


def lorc_factors(W: np.ndarray, Wq: np.ndarray, rank: int, dtype: str = "fp16",
                 H: np.ndarray | None = None, percdamp: float = 0.01) -> LowRank:
    """Rank-``rank`` factors of ``W - Wq`` (both float32 ``[out, in]``).

    Args:
        H: optional float ``[in, in]`` input Hessian: minimise the error of ``x @ (W - Wq)^T``
            over the calibration inputs instead of the Frobenius error (``weight="hessian"``).
        percdamp: dampening of ``H``, a fraction of its mean diagonal.
    Returns:
        LowRank with A float32 ``[out, r]`` and B float32 ``[r, in]`` representable in dtype.
    """
    out_f, in_f = W.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise InputError(f"LoRC rank expected in 1..{min(out_f, in_f)} (not {rank})")
    E = np.asarray(W, dtype=np.float64) - np.asarray(Wq, dtype=np.float64)
    L = None if H is None else _cholesky_lower(H, in_f, percdamp)
    U, S, Vt = np.linalg.svd(E if L is None else E @ L, full_matrices=False)
    r = np.sqrt(S[:rank])
    Bt = r[:, None] * Vt[:rank]
    A = U[:, :rank] * r
    if L is not None:                          # B = Bt L^-1, i.e. L^T B^T = Bt^T
        Bt = np.linalg.solve(L.T, Bt.T).T
        # L^-1 rescales B's rows: even out max|A[:, k]| and max|B[k]| again (fp16 range)
        c = np.sqrt(np.abs(Bt).max(axis=1) / np.maximum(np.abs(A).max(axis=0), 1e-30))
        c = np.where(np.isfinite(c) & (c > 0), c, 1.0)
        A, Bt = A * c, Bt / c[:, None]
    A = A.astype(np.float32)
    return LowRank(round_to_dtype(A, dtype), round_to_dtype(Bt.astype(np.float32), dtype), dtype)
