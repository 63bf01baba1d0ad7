"""The damped inverse Hessian that GPTQ-style methods walk, with reported automatic retries.

GPTQ (IST-DASLab ``fasterquant``) uses a single object from the Hessian ``H [in, in]``: the
upper Cholesky factor ``U`` of ``(H + damp * I)^-1``, computed as cholesky -> cholesky_inverse
-> cholesky(upper). ``U[j, j]**2 == inv(H[j:, j:])[0, 0]`` (the OBQ inverse-Hessian diagonal of
the columns still unquantized at step ``j``).

Failure policy (every choice lands in the report, nothing is silent):

| step | damp                                    | precision |
|------|-----------------------------------------|-----------|
| 1    | ``percdamp * mean(diag H)``             | fp32      |
| 2..  | percdamp x ``growth`` each try, to ``max_percdamp`` | fp32 |
| last | ``max_percdamp * mean(diag H)``         | fp64, result cast to fp32 |
| else | NumericsError naming the tensor and every damp tried |   |
"""
from __future__ import annotations

from typing import Any

import torch

from qexport.errors import NumericsError

__all__ = ["fix_dead_columns", "inverse_hessian_factor", "percdamp_schedule"]


def fix_dead_columns(H: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """In place, as GPTQ does: columns whose input is always zero (``diag(H) == 0``) get
    ``H[d, d] = 1`` and ``W[:, d] = 0``.

    Args:
        H: float32 ``[in, in]`` (modified).
        W: float32 ``[out, in]`` (modified).
    Returns:
        bool ``[in]`` mask of the dead columns.
    """
    dead = torch.diagonal(H) == 0
    idx = torch.nonzero(dead).flatten()
    H[idx, idx] = 1
    W[:, idx] = 0
    return dead


def percdamp_schedule(percdamp: float, max_percdamp: float, growth: float) -> list[float]:
    """Relative damps to try in fp32: ``percdamp``, x growth, ... capped at ``max_percdamp``."""
    out = [float(percdamp)]
    while out[-1] < max_percdamp and growth > 1:
        out.append(min(out[-1] * growth, float(max_percdamp)))
    return out


def _factor(H: torch.Tensor, damp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp I)^-1`` in ``dtype`` as float32, or None."""
    Hd = H.to(dtype).clone()
    Hd.diagonal().add_(damp.to(dtype))
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        return None
    U = U.to(torch.float32)
    if not bool(torch.isfinite(U).all()) or not bool((torch.diagonal(U) > 0).all()):
        return None
    return U


def _mean_diag(H: torch.Tensor, name: str) -> torch.Tensor:
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise NumericsError(f"{name}: Hessian expected square [in, in] (not {list(H.shape)})")
    if not bool(torch.isfinite(H).all()):
        raise NumericsError(f"{name}: Hessian expected finite values (found "
                            f"{int((~torch.isfinite(H)).sum())} NaN/inf)")
    dg = torch.diagonal(H)
    if bool((dg < 0).any()):
        raise NumericsError(f"{name}: Hessian expected a non-negative diagonal (found "
                            f"{float(dg.min())}); it is not positive semi-definite")
    mean = torch.mean(dg)
    if not float(mean) > 0:
        raise NumericsError(f"{name}: Hessian expected a positive diagonal mean (found "
                            f"{float(mean)}): no calibration signal reached this tensor")
    return mean


def inverse_hessian_factor(H: torch.Tensor, *, name: str = "tensor", percdamp: float = 0.01,
                           max_percdamp: float = 1.0, growth: float = 10.0
                           ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Upper Cholesky factor of the damped inverse Hessian, retrying with larger damps.

    Args:
        H: float32 ``[in, in]`` symmetric PSD Hessian with dead columns already fixed (not
            modified).
        name: tensor name for errors.
        percdamp: first relative damp (IST-DASLab default 0.01).
        max_percdamp: largest relative damp tried.
        growth: factor between successive damps.
    Returns:
        ``(U, report)``: U float32 ``[in, in]`` upper triangular; report with ``percdamp`` and
        ``damp`` (absolute) actually used, ``retries``, ``fp64`` and ``percdamps_tried``.
    Raises:
        NumericsError: non-finite H, negative diagonal, zero diagonal mean, or no damp works.
    """
    mean = _mean_diag(H, name)
    tried: list[float] = []
    for p in percdamp_schedule(percdamp, max_percdamp, growth):
        damp = p * mean                      # fp32 0-dim tensor, as in IST-DASLab
        tried.append(p)
        U = _factor(H, damp, torch.float32)
        if U is not None:
            return U, {"percdamp": p, "damp": float(damp), "retries": len(tried) - 1,
                       "fp64": False, "percdamps_tried": tried}
    p = tried[-1]
    damp64 = p * mean.double()
    U = _factor(H, damp64, torch.float64)
    if U is not None:
        return U, {"percdamp": p, "damp": float(damp64), "retries": len(tried),
                   "fp64": True, "percdamps_tried": tried}
    raise NumericsError(f"{name}: Cholesky of the damped Hessian failed with percdamp "
                        f"{tried} (fp32) and {p} (fp64), mean diag {float(mean):.4g}; "
                        "expected a positive semi-definite Hessian (check the calibration "
                        "activations)")
