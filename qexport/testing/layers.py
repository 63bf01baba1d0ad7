"""Random layers for method tests: a weight and the Hessian of correlated, unevenly scaled
inputs (neighbouring input channels correlated 0.6, channel scales log-normal)."""
from __future__ import annotations

import numpy as np

__all__ = ["correlated_layer"]


def correlated_layer(rng: np.random.Generator, out_f: int, in_f: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(W, H)``: float32 ``[out_f, in_f]`` weight (std 0.05) and float32 ``[in_f, in_f]``
    Hessian ``2/N X^T X`` of 1024 such inputs."""
    X = rng.standard_normal((1024, in_f)) * np.exp(0.5 * rng.standard_normal(in_f))
    X[:, 1:] += 0.6 * X[:, :-1]
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    return W, (2.0 / 1024 * X.T @ X).astype(np.float32)
