"""LoRC residual factors: exact at full rank, optimal (Eckart-Young) at rank r, storable in
fp16, and counted in a tensor's bits per weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.errors import InputError, NumericsError
from qexport.grids import GridSpec, check_representable
from qexport.ir import QTensor
from qexport.methods import gptq_quantize, rtn_quantize
from qexport.methods.lorc import lorc_factors


def _quantized(rng: np.random.Generator, out_f: int = 48, in_f: int = 96
               ) -> tuple[np.ndarray, np.ndarray, QTensor]:
    W = (rng.standard_t(4, (out_f, in_f)) * 0.05).astype(np.float32)
    res = rtn_quantize(W, GridSpec.affine(3, 32, True), name="l.w")
    return W, res.dequantize(), res.to_qtensor("l.w")


def _tail_norm(E: np.ndarray, r: int) -> float:
    """Eckart-Young: the smallest ||E - M||_F over rank-r M (torch's SVD, not numpy's)."""
    S = torch.linalg.svdvals(torch.from_numpy(E.astype(np.float64))).numpy()
    return float(np.sqrt(np.sum(S[r:] ** 2)))


def test_full_rank_fp32_reconstructs_w(rng):
    W, Wq, _ = _quantized(rng)
    lr = lorc_factors(W, Wq, 48, dtype="fp32")
    assert lr.A.shape == (48, 48) and lr.B.shape == (48, 96) and lr.dtype == "fp32"
    back = Wq + lr.matrix()
    np.testing.assert_allclose(back, W, rtol=0, atol=2e-6 * np.abs(W).max())


def test_rank_r_is_the_optimal_truncation_and_error_decreases(rng):
    W, Wq, _ = _quantized(rng)
    E = W.astype(np.float64) - Wq
    errs = []
    for r in (1, 2, 4, 8, 16, 32):
        e32 = np.linalg.norm(E - lorc_factors(W, Wq, r, dtype="fp32").matrix())
        e16 = np.linalg.norm(E - lorc_factors(W, Wq, r, dtype="fp16").matrix())
        best = _tail_norm(E, r)
        assert e32 == pytest.approx(best, rel=1e-4)
        assert best <= e16 <= best * 1.01 + 1e-7           # fp16 storage costs little
        errs.append(e16)
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[0] < np.linalg.norm(E)


def test_factors_fp16_representable_and_balanced(rng):
    W, Wq, qt = _quantized(rng)
    lr = lorc_factors(W, Wq, 8)
    assert lr.dtype == "fp16" and lr.A.dtype == np.float32 and lr.B.dtype == np.float32
    check_representable(lr.A, "fp16", "A")
    check_representable(lr.B, "fp16", "B")
    lr.validate(qt.shape, "l.w")
    # symmetric sqrt(S) split: column norms of A equal row norms of B (= sqrt(sigma_i))
    np.testing.assert_allclose(np.linalg.norm(lr.A, axis=0), np.linalg.norm(lr.B, axis=1),
                               rtol=2e-3)


def test_bits_per_weight_includes_factors(rng):
    W, Wq, qt = _quantized(rng, 48, 96)
    base = qt.bits_per_weight()
    assert base == pytest.approx(3 + 16 / 32)               # 3-bit codes + fp16 scale / 32
    qt.residual = lorc_factors(W, Wq, 8)
    qt.validate()
    assert qt.bits()["residual"] == 8 * (48 + 96) * 16
    assert qt.bits_per_weight() == pytest.approx(base + 8 * (48 + 96) * 16 / (48 * 96))
    np.testing.assert_array_equal(qt.dequantize(with_residual=False), Wq)
    np.testing.assert_array_equal(qt.dequantize(), Wq + qt.residual.matrix())


def test_lorc_on_gptq_reduces_error(rng):
    X = rng.standard_normal((256, 64))
    H = (2.0 / 256 * X.T @ X).astype(np.float32)
    W = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
    res = gptq_quantize(W, H, GridSpec.affine(2, 32, False))
    Wq = res.dequantize()
    lr = lorc_factors(W, Wq, 4)
    assert np.linalg.norm(W - Wq - lr.matrix()) < 0.9 * np.linalg.norm(W - Wq)


@pytest.mark.parametrize("rank", [0, -1, 49])
def test_rank_out_of_range(rng, rank):
    W, Wq, _ = _quantized(rng)
    with pytest.raises(InputError, match="rank"):
        lorc_factors(W, Wq, rank)


def _calib_inputs(rng: np.random.Generator, in_f: int = 96, n: int = 512) -> np.ndarray:
    """Correlated inputs with a few loud channels (like post-norm activations)."""
    X = rng.standard_normal((n, in_f)) @ rng.standard_normal((in_f, in_f)) * 0.2
    X[:, :4] *= 20
    return X


def test_hessian_weighting_is_the_optimal_output_error_truncation(rng):
    """Hessian-weighted factors minimise ||X (E - M)^T||_F over rank-r M: equal to the
    Eckart-Young bound of E L, below the Frobenius factors' output error, and above it in the
    Frobenius norm they do not minimise."""
    W, Wq, _ = _quantized(rng)
    X = _calib_inputs(rng)
    H = 2.0 / X.shape[0] * X.T @ X
    E = W.astype(np.float64) - Wq
    L = np.linalg.cholesky(H + 1e-9 * np.eye(96))
    for r in (1, 4, 8):
        fro = lorc_factors(W, Wq, r, dtype="fp32").matrix()
        hes = lorc_factors(W, Wq, r, dtype="fp32", H=H, percdamp=1e-9).matrix()
        out = lambda M: float(np.linalg.norm(X @ (E - M).T))     # noqa: E731
        best = _tail_norm(E @ L, r) * np.sqrt(X.shape[0] / 2.0)
        assert out(hes) == pytest.approx(best, rel=1e-4)
        assert out(hes) < 0.95 * out(fro)
        assert np.linalg.norm(E - hes) > np.linalg.norm(E - fro)


def test_hessian_weighting_full_rank_and_fp16_balanced(rng):
    W, Wq, qt = _quantized(rng)
    X = _calib_inputs(rng) * 1e-3                 # tiny inputs: L^-1 would blow B up
    H = (2.0 / X.shape[0] * X.T @ X).astype(np.float32)
    back = Wq + lorc_factors(W, Wq, 48, dtype="fp32", H=H).matrix()
    np.testing.assert_allclose(back, W, rtol=0, atol=1e-5 * np.abs(W).max())
    lr = lorc_factors(W, Wq, 8, H=H)
    lr.validate(qt.shape, "l.w")
    np.testing.assert_allclose(np.abs(lr.A).max(axis=0), np.abs(lr.B).max(axis=1), rtol=2e-2)
    H[5, :] = H[:, 5] = 0                          # a dead input column
    assert np.isfinite(lorc_factors(W, Wq, 8, H=H).matrix()).all()


@pytest.mark.parametrize("bad,match", [(np.eye(95), r"\[96, 96\]"),
                                       (np.full((96, 96), np.nan), "finite")])
def test_hessian_checked(rng, bad, match):
    W, Wq, _ = _quantized(rng)
    with pytest.raises((InputError, NumericsError), match=match):
        lorc_factors(W, Wq, 4, H=bad)
