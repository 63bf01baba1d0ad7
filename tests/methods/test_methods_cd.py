"""Coordinate descent over the codes (``--cd P``): one pass equals a slow reference that tries
every level of every weight in turn against the full objective; passes never raise the
objective; the grid and the spec are untouched; a diagonal Hessian gives nearest rounding; and
weights on the grid are a fixed point."""
from __future__ import annotations

import numpy as np
import pytest

from qexport.grids import GridSpec, dequantize, validate
from qexport.grids.fit import quantize_nearest
from qexport.methods import gptq_quantize
from qexport.methods.cd import cd_codes
from qexport.testing.layers import correlated_layer as layer
from qexport.testing.specs import CODEBOOK_SPECS, METHOD_SPECS, SUPER_SPECS

SPECS = {**METHOD_SPECS, "q4_0": GridSpec.affine(4, 32, True, name="q4_0-like"),
         "q3_k": SUPER_SPECS["q3_k"], "q2_k": SUPER_SPECS["q2_k"],
         "free4g32": CODEBOOK_SPECS["free4g32"]}


def _objective(W, Q, H) -> float:
    E = W.astype(np.float64) - Q
    return float(np.einsum("ij,ij->", E @ H.astype(np.float64), E))


def _reference_pass(W, H, codes, grid, spec) -> np.ndarray:
    """Oracle: for each column, each row, every code in turn, decoded by grids.dequantize, and
    the one with the lowest full objective kept (float64, no incremental updates)."""
    codes = codes.copy()
    for j in range(W.shape[1]):
        for i in range(W.shape[0]):
            best = (np.inf, codes[i, j])
            for k in range(spec.maxq + 1):
                codes[i, j] = k
                row = dequantize(codes[i:i + 1], _row(grid, i), spec)
                f = _objective(W[i:i + 1], row, H)
                best = min(best, (f, k))
            codes[i, j] = best[1]
    return codes


def _row(grid, i):
    from qexport.grids.grid import grid_from_arrays
    return grid_from_arrays(grid.kind, {k: v[i:i + 1] for k, v in grid.arrays().items()})


@pytest.mark.parametrize("key", ["w3g128a", "q3_k", "iq4_nl"])
def test_one_pass_equals_the_reference(rng, key):
    spec = SPECS[key]
    W, H = layer(rng, 3, 256)
    res = gptq_quantize(W, H, spec, actorder=True)
    got, st = cd_codes(W, H, res.codes, res.grid, spec, 1)
    want = _reference_pass(W, H, res.codes, res.grid, spec)
    np.testing.assert_array_equal(got, want)
    assert st["cd_changed"] > 0


@pytest.mark.parametrize("key", sorted(SPECS))
def test_passes_never_raise_the_objective(rng, key):
    spec = SPECS[key]
    W, H = layer(rng, 8, 512)
    res = gptq_quantize(W, H, spec, actorder=True)
    f = [_objective(W, res.dequantize(), H)]
    codes = res.codes
    for _ in range(3):
        codes, _ = cd_codes(W, H, codes, res.grid, spec, 1)
        validate(codes, res.grid, spec, "t")
        f.append(_objective(W, dequantize(codes, res.grid, spec), H))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(f, f[1:]))
    assert f[-1] < 0.99 * f[0]


def test_ridge_is_the_damped_objective(rng):
    """With a ridge, CD minimises the objective under ``H + percdamp * mean(diag H) * I``: the
    result equals an undamped pass on that matrix, and ``cd_gain`` is its ratio."""
    spec = SPECS["q3_k"]
    W, H = layer(rng, 8, 512)
    res = gptq_quantize(W, H, spec, actorder=True)
    got, st = cd_codes(W, H, res.codes, res.grid, spec, 2, percdamp=0.1)
    Hd = (H.astype(np.float64) + 0.1 * np.mean(np.diag(H)) * np.eye(512))
    want, _ = cd_codes(W, Hd.astype(np.float32), res.codes, res.grid, spec, 2)
    assert (got != want).mean() < 1e-3                      # float32 rounding of Hd aside
    ratio = _objective(W, dequantize(got, res.grid, spec), Hd) / \
        _objective(W, res.dequantize(), Hd)
    assert st["cd_gain"] == pytest.approx(ratio, rel=1e-5)


def test_diagonal_hessian_gives_nearest_rounding(rng):
    spec = SPECS["q3_k"]
    W, H = layer(rng, 8, 512)
    Hdiag = np.diag(np.diag(H)).astype(np.float32)
    res = gptq_quantize(W, H, spec, actorder=True)            # codes far from nearest
    got, _ = cd_codes(W, Hdiag, res.codes, res.grid, spec, 1)
    np.testing.assert_array_equal(got, quantize_nearest(spec, res.grid, W))


def test_weights_on_the_grid_are_a_fixed_point(rng):
    spec = SPECS["q2_k"]
    W, H = layer(rng, 8, 512)
    res = gptq_quantize(W, H, spec)
    got, st = cd_codes(res.dequantize().astype(np.float32), H, res.codes, res.grid, spec, 2)
    np.testing.assert_array_equal(got, res.codes)
    assert st["cd_changed"] == 0.0


def test_dead_columns_keep_their_codes(rng):
    spec = SPECS["w3g128a"]
    W, H = layer(rng, 8, 256)
    H[:, 5] = 0.0
    H[5, :] = 0.0
    res = gptq_quantize(W, H, spec)
    got, _ = cd_codes(W, H, res.codes, res.grid, spec, 2)
    np.testing.assert_array_equal(got[:, 5], res.codes[:, 5])
