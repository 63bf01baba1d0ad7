"""The damped inverse-Hessian factor: OBQ identity, retries, fp64 fallback, numerical errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qexport.methods.hessian as hess
from qexport.errors import NumericsError
from qexport.grids import GridSpec
from qexport.methods import (gptq_quantize, hessian_objective, inverse_hessian_factor,
                             percdamp_schedule, rtn_quantize)


def spd_with_eigs(rng: np.random.Generator, eigs: np.ndarray) -> torch.Tensor:
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    H = (Q * eigs) @ Q.T
    return torch.from_numpy(((H + H.T) / 2).astype(np.float32))


def test_u_diag_is_obq_remaining_inverse_diag(rng):
    """U upper, U^T U = (H + damp I)^-1 and U[j, j]^2 = inv(Hd[j:, j:])[0, 0] (not diag(Hd^-1))."""
    X = rng.standard_normal((200, 48)) @ (np.eye(48) + 0.5 * rng.standard_normal((48, 48)))
    H = torch.from_numpy((2 / 200 * X.T @ X).astype(np.float32))
    U, rep = inverse_hessian_factor(H, name="t")
    Hd = H.double().numpy() + rep["damp"] * np.eye(48)
    Ud = U.double().numpy()
    assert np.array_equal(Ud, np.triu(Ud))
    np.testing.assert_allclose(Ud.T @ Ud, np.linalg.inv(Hd), rtol=2e-3, atol=1e-6)
    want = np.array([np.linalg.inv(Hd[j:, j:])[0, 0] for j in range(48)])
    np.testing.assert_allclose(np.diag(Ud) ** 2, want, rtol=2e-4)
    assert not np.allclose(want[1:], np.diag(np.linalg.inv(Hd))[1:], rtol=1e-2)
    assert rep["retries"] == 0 and rep["fp64"] is False and rep["percdamp"] == 0.01
    assert rep["damp"] == pytest.approx(0.01 * float(torch.diagonal(H).mean()), rel=1e-6)


def test_percdamp_schedule():
    assert percdamp_schedule(0.01, 1.0, 10) == [0.01, 0.1, 1.0]
    assert percdamp_schedule(0.03, 1.0, 10) == [0.03, 0.3, 1.0]
    assert percdamp_schedule(2.0, 1.0, 10) == [2.0]


def test_indefinite_hessian_retries_with_larger_damp(rng):
    eigs = np.linspace(0.5, 1.5, 32)
    eigs[0] = -0.05                                        # slightly indefinite: 0.01 fails
    U, rep = inverse_hessian_factor(spd_with_eigs(rng, eigs), name="t")
    assert rep["retries"] == 1 and rep["percdamp"] == pytest.approx(0.1)
    assert rep["percdamps_tried"] == [0.01, 0.1] and rep["fp64"] is False
    assert torch.isfinite(U).all()


def test_hopeless_hessian_raises_naming_tensor_and_damps(rng):
    eigs = np.linspace(0.5, 1.5, 64)
    eigs[0] = -1.5                           # below -mean(diag): even percdamp 1.0 fails
    with pytest.raises(NumericsError, match=r"blk.3.q: .*\[0.01, 0.1, 1.0\] \(fp32\).*fp64"):
        inverse_hessian_factor(spd_with_eigs(rng, eigs), name="blk.3.q")


def test_fp64_fallback_is_used_and_reported(rng, monkeypatch):
    real = hess._factor

    def fp32_fails(H, damp, dtype):
        return None if dtype == torch.float32 else real(H, damp, dtype)

    monkeypatch.setattr(hess, "_factor", fp32_fails)
    H = spd_with_eigs(rng, np.linspace(0.5, 1.5, 16))
    U, rep = inverse_hessian_factor(H, name="t")
    assert rep["fp64"] is True and rep["retries"] == 3 and rep["percdamp"] == 1.0
    assert U.dtype == torch.float32
    Hd = H.double().numpy() + rep["damp"] * np.eye(16)
    np.testing.assert_allclose(U.double().numpy().T @ U.double().numpy(), np.linalg.inv(Hd),
                               rtol=1e-5, atol=1e-7)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    res = gptq_quantize(W, H, GridSpec.affine(4, -1, True), name="t")
    assert res.stats["fp64"] is True and res.stats["retries"] == 3


@pytest.mark.parametrize("bad,match", [
    (lambda H: H.fill_diagonal_(float("nan")), "finite"),
    (lambda H: H.__setitem__((0, 3), float("inf")), "finite"),
    (lambda H: H.__setitem__((2, 2), -1.0), "non-negative diagonal"),
])
def test_bad_hessians_raise(rng, bad, match):
    H = spd_with_eigs(rng, np.linspace(0.5, 1.5, 8))
    bad(H)
    with pytest.raises(NumericsError, match=f"lm.x: .*{match}"):
        inverse_hessian_factor(H, name="lm.x")


def test_gptq_all_zero_hessian_raises(rng):
    W = rng.standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(NumericsError, match="model.layers.1.mlp.up_proj.weight: .*all zero"):
        gptq_quantize(W, np.zeros((64, 64), np.float32), GridSpec.affine(4, 32, True),
                      name="model.layers.1.mlp.up_proj.weight")


def test_gptq_rank_deficient_hessian_succeeds(rng):
    """16 calibration rows for 64 inputs: rank 16, made PD by the first damp."""
    W = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
    X = rng.standard_normal((16, 64))
    H = (2 / 16 * X.T @ X).astype(np.float32)
    assert np.linalg.matrix_rank(H) == 16
    spec = GridSpec.affine(4, 32, False)
    res = gptq_quantize(W, H, spec, name="t")
    assert res.stats["retries"] == 0 and np.isfinite(res.stats["objective"])
    assert res.stats["objective"] < hessian_objective(W, rtn_quantize(W, spec).dequantize(), H)


def test_gptq_indefinite_hessian_reports_retries(rng):
    eigs = np.linspace(0.5, 1.5, 64)
    eigs[:3] = -0.05
    W = rng.standard_normal((8, 64)).astype(np.float32)
    res = gptq_quantize(W, spd_with_eigs(rng, eigs), GridSpec.affine(4, 32, True), name="t")
    assert res.stats["retries"] == 1 and res.stats["percdamp"] == pytest.approx(0.1)


@pytest.mark.parametrize("where", ["W", "H"])
def test_nan_inputs_raise(rng, where):
    W = rng.standard_normal((8, 64)).astype(np.float32)
    H = np.eye(64, dtype=np.float32)
    (W if where == "W" else H)[3, 7] = np.nan
    with pytest.raises(NumericsError, match=r"blk.0.attn_q: .*NaN/inf, first at \[3, 7\]"):
        gptq_quantize(W, H, GridSpec.affine(4, 32, True), name="blk.0.attn_q")
    if where == "W":
        with pytest.raises(NumericsError, match="blk.0.attn_q: weight expected finite"):
            rtn_quantize(torch.from_numpy(W), GridSpec.affine(4, 32, True), name="blk.0.attn_q")
