"""GPTQ's pluggable span fitter: default unchanged, the loss weights it hands over are
``U_jj^-p`` of an independently computed Cholesky factor, and spans see the right weights."""
from __future__ import annotations

import numpy as np
import pytest

from qexport.grids import GridKind, GridSpec, ZeroDomain, fit_minmax
from qexport.methods import gptq_quantize

Q4K = GridSpec(name="q4_k-like", kind=GridKind.SUPERBLOCK, bits=4, group_size=32,
               super_size=256, zero=ZeroDomain.FLOAT, sub_scale_range=(0, 63),
               sub_min_range=(0, 63), row_multiple=256)


def layer(rng: np.random.Generator, out_f: int, in_f: int) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((512, in_f)) * np.exp(rng.standard_normal(in_f))
    X[:, 1:] += 0.8 * X[:, :-1]
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    return W, (2.0 / 512 * X.T @ X).astype(np.float32)


class Recorder:
    """A fitter that returns fit_minmax and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def __call__(self, spec, W_span, col0, weights):
        self.calls.append((col0, np.array(W_span), np.array(weights)))
        return fit_minmax(spec, W_span)


@pytest.mark.parametrize("spec,actorder,static", [
    (GridSpec.affine(4, 32, True), False, False),
    (GridSpec.affine(3, 48, False), False, True),
    (GridSpec.affine(4, -1, False), True, False),
    (GridSpec.affine(4, 64, False), True, False),
    (Q4K, False, False),
])
def test_minmax_fitter_is_bit_identical_to_default(rng, spec, actorder, static):
    W, H = layer(rng, 24, 256)
    rec = Recorder()
    a = gptq_quantize(W, H, spec, actorder=actorder, static_groups=static)
    b = gptq_quantize(W, H, spec, actorder=actorder, static_groups=static, fitter=rec)
    assert np.array_equal(a.codes, b.codes)
    for k, v in a.grid.arrays().items():
        assert np.array_equal(v, b.grid.arrays()[k])
    L = 256 if spec.param_span == -1 else spec.param_span
    assert [c[0] for c in rec.calls] == list(range(0, 256, L))


def _expected_weights(H: np.ndarray, p: float, percdamp: float, actorder: bool) -> np.ndarray:
    """U_jj^-p in original column order from a float64 numpy factorisation."""
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    n = H.shape[0]
    perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(n)
    Hp = H[perm][:, perm]
    Hp[np.diag_indices(n)] += percdamp * np.mean(np.diag(Hp))
    U = np.linalg.cholesky(np.linalg.inv(Hp)).T                    # upper: H^-1 = U^T U
    s = np.empty(n)
    s[perm] = np.diag(U) ** -p
    s[dead] = 0
    return s


@pytest.mark.parametrize("actorder", [False, True])
def test_weights_are_inverse_hessian_cholesky_diagonal(rng, actorder):
    W, H = layer(rng, 16, 96)
    H[5, :] = 0
    H[:, 5] = 0
    rec = Recorder()
    gptq_quantize(W, H, GridSpec.affine(4, -1, False), actorder=actorder, percdamp=0.1,
                  fitter=rec, fit_p=3.0)
    (col0, W_span, w), = rec.calls
    want = _expected_weights(H, 3.0, 0.1, actorder)
    assert w.dtype == np.float32 and w[5] == 0
    np.testing.assert_allclose(w, want, rtol=2e-3)
    Wd = W.copy()
    Wd[:, 5] = 0
    assert np.array_equal(W_span, Wd)                  # per-channel: the dead-masked original


def test_static_spans_get_original_w_and_dynamic_spans_the_updated_one(rng):
    W, H = layer(rng, 16, 128)
    spec = GridSpec.affine(4, 32, False)
    static, dynamic = Recorder(), Recorder()
    gptq_quantize(W, H, spec, static_groups=True, fitter=static)
    gptq_quantize(W, H, spec, fitter=dynamic)
    w_all = _expected_weights(H, 4.0, 0.01, False)
    for rec in (static, dynamic):
        assert [c[0] for c in rec.calls] == [0, 32, 64, 96]
        for c0, _, w in rec.calls:
            np.testing.assert_allclose(w, w_all[c0:c0 + 32], rtol=2e-3)
    for c0, Ws, _ in static.calls:
        assert np.array_equal(Ws, W[:, c0:c0 + 32])
    assert np.array_equal(dynamic.calls[0][1], W[:, :32])
    for c0, Ws, _ in dynamic.calls[1:]:
        assert not np.allclose(Ws, W[:, c0:c0 + 32])   # error feedback moved them


def test_huge_exponent_is_clamped_not_inf(rng):
    W, H = layer(rng, 8, 64)
    rec = Recorder()
    gptq_quantize(W, H * 1e12, GridSpec.affine(4, -1, False), fitter=rec, fit_p=40.0)
    w = rec.calls[0][2]
    assert np.all(np.isfinite(w)) and w.max() <= 1e30 and w.max() > 0
