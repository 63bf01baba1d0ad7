"""Batched weighted 1-D k-means against sklearn (the LeanQuant reference's clusterer) and
against brute force for the exact dynamic-programming variant."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from qexport.errors import InputError
from qexport.methods.kmeans import optimal_kmeans_1d, weighted_kmeans_1d

KMeans = pytest.importorskip("sklearn.cluster").KMeans


def _inertia(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (w * np.min((x[:, :, None] - c[:, None, :]) ** 2, axis=2)).sum(1)


def _rows(rng: np.random.Generator, rows: int, n: int, outliers: bool) -> np.ndarray:
    x = rng.standard_normal((rows, n)) * np.exp(rng.standard_normal((rows, 1)))
    if outliers:                       # far points leave linspace-initialised centers empty
        x[:, :2] *= 8
    return x


def _sklearn(x: np.ndarray, w: np.ndarray, init: np.ndarray) -> np.ndarray:
    out = []
    for r in range(x.shape[0]):
        km = KMeans(init.shape[1], init=init[r][:, None], n_init=1, max_iter=100, tol=1e-6)
        out.append(np.sort(km.fit(x[r][:, None], sample_weight=w).cluster_centers_[:, 0]))
    return np.array(out)


@pytest.mark.parametrize("k,outliers", [(4, False), (8, False), (8, True), (16, False)])
def test_uniform_init_matches_sklearn(rng, k, outliers):
    x = _rows(rng, 6, 150, outliers)
    w = np.exp(1.5 * rng.standard_normal(150))
    init = np.linspace(x.min(1), x.max(1), k).T
    ours, info = weighted_kmeans_1d(x, w, k, init="uniform", max_iter=100, tol=1e-6)
    ref = _sklearn(x, w, init)
    scale = np.abs(x).max(1, keepdims=True)
    np.testing.assert_allclose(ours / scale, ref / scale, rtol=0, atol=1e-5)
    assert info["iters_max"] >= 2


def test_explicit_init_and_per_row_weights_match_sklearn(rng):
    x = _rows(rng, 6, 80, False)
    w = rng.random((6, 80)) + 0.01
    init = np.stack([np.sort(rng.choice(r, 6, replace=False)) for r in x])
    ours, _ = weighted_kmeans_1d(x, w, 6, init=init)
    ref = np.array([np.sort(KMeans(6, init=init[r][:, None], n_init=1, max_iter=100, tol=1e-6)
                            .fit(x[r][:, None], sample_weight=w[r]).cluster_centers_[:, 0])
                    for r in range(6)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(x).max())


def test_zero_weights_do_not_move_centers(rng):
    x = _rows(rng, 4, 60, False)
    w = np.exp(rng.standard_normal(60))
    w[:10] = 0
    x2 = x.copy()
    x2[:, :10] = rng.uniform(x.min(), x.max(), (4, 10))     # zero-weight points anywhere
    init = np.sort(x[:, 10:14], axis=1)
    a, _ = weighted_kmeans_1d(x[:, 10:], w[10:], 4, init=init, tol=0.0)
    b, _ = weighted_kmeans_1d(x2, w, 4, init=init, tol=0.0)
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_kmeanspp_is_seeded_and_as_good_as_sklearn(rng):
    x = _rows(rng, 10, 200, True)
    w = np.exp(rng.standard_normal(200))
    a, _ = weighted_kmeans_1d(x, w, 16, init="kmeans++", seed=3)
    b, _ = weighted_kmeans_1d(x, w, 16, init="kmeans++", seed=3)
    c, _ = weighted_kmeans_1d(x, w, 16, init="kmeans++", seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ref = [KMeans(16, init="k-means++", n_init=1, max_iter=100, tol=1e-6, random_state=s)
           .fit(x[r][:, None], sample_weight=w).inertia_ for r in range(10) for s in (0, 1)]
    ours = _inertia(x, w, a).sum()
    assert ours < 1.15 * np.sum(ref) / 2


def test_optimal_matches_brute_force(rng):
    for _ in range(15):
        n, k = 9, 3
        x = rng.standard_normal((1, n))
        w = rng.random(n) + 0.05
        xs, ws = np.sort(x[0]), w[np.argsort(x[0])]
        best = np.inf
        for cuts in itertools.combinations(range(1, n), k - 1):
            b = (0,) + cuts + (n,)
            tot = 0.0
            for lo, hi in zip(b[:-1], b[1:]):
                m = (ws[lo:hi] * xs[lo:hi]).sum() / ws[lo:hi].sum()
                tot += (ws[lo:hi] * (xs[lo:hi] - m) ** 2).sum()
            best = min(best, tot)
        got = _inertia(x, w, optimal_kmeans_1d(x, w, k))[0]
        assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_optimal_never_worse_than_lloyd(rng):
    x = _rows(rng, 8, 120, True)
    w = np.exp(rng.standard_normal(120))
    lloyd, _ = weighted_kmeans_1d(x, w, 8, init="uniform")
    opt = optimal_kmeans_1d(x, w, 8)
    assert np.all(_inertia(x, w, opt) <= _inertia(x, w, lloyd) * (1 + 1e-9))
    assert np.all(np.diff(opt, axis=1) >= 0)


@pytest.mark.filterwarnings("ignore::UserWarning")          # sklearn: fewer distinct points
def test_degenerate_rows_match_sklearn_and_errors():
    x = np.zeros((3, 40))
    x[1] = 2.5
    x[2, :20] = 1.0                                   # two distinct values, four clusters
    x[2, 0] = 0.9
    init = np.linspace(x.min(1), x.max(1), 4).T
    c, _ = weighted_kmeans_1d(x, np.ones(40), 4, init="uniform")
    assert np.all(c[0] == 0) and np.all(c[1] == 2.5)
    np.testing.assert_allclose(c[2], _sklearn(x[2:], np.ones(40), init[2:])[0], atol=1e-12)
    with pytest.raises(InputError, match="init"):
        weighted_kmeans_1d(x, np.ones(40), 4, init="random")
    with pytest.raises(InputError, match="weights"):
        weighted_kmeans_1d(x, -np.ones(40), 4)
