"""Sub-scale re-fit (``--refit-sub``): the continuous sub-scales / sub-mins are the Hessian
least-squares optimum (checked against a dense solve built from the reference decoder), the
rounding with error feedback reduces to plain rounding when the normal matrix is diagonal, a
grid the weights lie on is recovered from scrambled integers, every row ends at most at the
``d``-only re-fit's objective, and the pipeline refuses ``--refit-sub`` without ``--refit``."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qexport.errors import UnsupportedError
from qexport.grids import SuperBlockGrid, dequantize, validate
from qexport.grids.grid import grid_from_arrays
from qexport.methods import gptq_quantize
from qexport.methods.refit import _table, refit_rounds, refit_scales
from qexport.methods.refit_sub import _fit_rows, _round_with_feedback, refit_subscales
from qexport.methods.result import hessian_objective
from qexport.pipeline import QuantizeOptions
from qexport.testing.layers import correlated_layer as layer
from qexport.testing.specs import METHOD_SPECS, SUPER_SPECS


def _rows(W, H, codes, grid, spec) -> np.ndarray:
    E = W.astype(np.float64) - dequantize(codes, grid, spec)
    return np.einsum("ij,ij->i", E @ H.astype(np.float64), E)


def _dense_subscale_optimum(W, H, codes, grid, spec) -> np.ndarray:
    """Oracle: per row, one basis column per sub-block scale (d = 1, that sc = 1, the rest 0)
    and per sub-min (dmin = 1, that m = 1, d = 0), decoded by grids.dequantize, then a dense
    weighted least-squares solve (float64). ``[out, n_sub * (1 or 2)]``."""
    arrays = grid.arrays()
    G = arrays["sc"].shape[1]
    out = []
    for r in range(W.shape[0]):
        cols = []
        for fam in ("sc", "m") if "m" in arrays else ("sc",):
            for g in range(G):
                unit = {k: np.zeros_like(v[r:r + 1]) for k, v in arrays.items()}
                unit["d" if fam == "sc" else "dmin"][:] = 1.0
                unit[fam][0, g] = 1
                cols.append(dequantize(codes[r:r + 1], grid_from_arrays(grid.kind, unit),
                                       spec)[0].astype(np.float64))
        B = np.stack(cols, axis=1)
        Hd = H.astype(np.float64)
        out.append(np.linalg.solve(B.T @ Hd @ B, B.T @ Hd @ W[r].astype(np.float64)))
    return np.stack(out)


@pytest.mark.parametrize("key", ["q2_k", "q3_k", "q4_k", "q6_k"])
def test_continuous_subscales_are_the_least_squares_optimum(rng, key):
    spec = SUPER_SPECS[key]
    W, H = layer(rng, 4, 512)
    res = gptq_quantize(W, H, spec)
    g = res.grid
    t = _table(spec, res.codes)
    coefs = [torch.from_numpy(t)] + ([torch.from_numpy(-np.ones_like(t))] if g.m is not None
                                     else [])
    want = _dense_subscale_optimum(W, H, res.codes, g, spec)
    # the ridge pulls towards theta0; at the optimum it pulls nowhere (sub-scales and sub-mins
    # are nearly collinear, so a pull towards 0 would show)
    theta, _ = _fit_rows(torch.from_numpy(W.astype(np.float64)),
                         torch.from_numpy(H.astype(np.float64)), coefs, spec.group_size,
                         torch.from_numpy(want))
    np.testing.assert_allclose(theta.numpy(), want, rtol=1e-4, atol=1e-6)


def test_rounding_with_a_diagonal_matrix_is_plain_rounding(rng):
    R, P = 5, 12
    theta = torch.from_numpy(rng.standard_normal((R, P)) * 3)
    M = torch.diag_embed(torch.from_numpy(rng.uniform(0.5, 2.0, (R, P))))
    step = torch.from_numpy(rng.uniform(0.2, 1.0, (R, P)))
    lo, hi = torch.full((R, P), -4.0, dtype=torch.float64), torch.full((R, P), 3.0,
                                                                        dtype=torch.float64)
    ints = _round_with_feedback(theta, M, step, lo, hi).numpy()
    np.testing.assert_array_equal(ints, np.clip(np.round(theta.numpy() / step.numpy()), -4, 3))


def _on_grid(rng, spec, R: int, K: int) -> tuple[np.ndarray, np.ndarray, SuperBlockGrid]:
    """Codes and a grid whose sub-scales (sub-mins) reach the top of their range in every
    super-block, so the re-fit's ``d`` (``dmin``) is exactly the grid's."""
    G, per = K // spec.group_size, spec.super_size // spec.group_size
    lo, hi = spec.sub_scale_range
    sc = rng.integers(max(lo, 1), hi + 1, (R, G)).astype(np.int16)
    sc.reshape(R, -1, per)[:, :, 0] = hi
    d = (rng.uniform(0.5, 1.5, (R, K // spec.super_size)) * 1e-3).astype(np.float16)
    arrays = {"d": d.astype(np.float32), "sc": sc}
    if spec.sub_min_range is not None:
        mlo, mhi = spec.sub_min_range
        m = rng.integers(mlo, mhi + 1, (R, G)).astype(np.int16)
        m.reshape(R, -1, per)[:, :, 0] = mhi
        arrays.update(dmin=(d * 0.7).astype(np.float32), m=m)
    grid = grid_from_arrays(spec.kind, arrays)
    codes = rng.integers(0, spec.maxq + 1, (R, K)).astype(np.uint8)
    return codes, dequantize(codes, grid, spec).astype(np.float32), grid


@pytest.mark.parametrize("key", ["q2_k", "q3_k", "q4_k", "q6_k"])
def test_scrambled_integers_are_recovered(rng, key):
    spec = SUPER_SPECS[key]
    codes, W, true = _on_grid(rng, spec, 6, 512)
    _, H = layer(rng, 1, 512)
    lo, hi = spec.sub_scale_range
    arr = dict(true.arrays())
    arr["sc"] = rng.integers(max(lo, 1), hi + 1, arr["sc"].shape).astype(np.int16)
    scrambled = grid_from_arrays(spec.kind, arr)
    plain, _ = refit_scales(W, H, codes, scrambled, spec)
    new, st = refit_subscales(W, H, codes, scrambled, spec)
    validate(codes, new, spec, "t")
    assert np.array_equal(new.sc, true.sc)
    assert st["refit_sub_rows"] == 1.0
    assert hessian_objective(W, dequantize(codes, new, spec), H) < \
        1e-6 * hessian_objective(W, dequantize(codes, plain, spec), H)


@pytest.mark.parametrize("key,gains", [("q2_k", True), ("q3_k", True), ("q4_k", False),
                                       ("q5_k", False), ("q6_k", True)])
def test_never_worse_than_the_d_only_refit_per_row(rng, key, gains):
    """At 2-3 bits (and Q6_K's 8-bit sub-scales) most rows gain. At Q4_K / Q5_K, rounding a
    6-bit sub-scale under 4-5-bit codes fitted to the old one usually costs more than the
    continuous fit gains, and the row keeps the ``d``-only re-fit."""
    spec = SUPER_SPECS[key]
    W, H = layer(rng, 16, 512)
    res = gptq_quantize(W, H, spec, actorder=True)
    plain, _ = refit_scales(W, H, res.codes, res.grid, spec)
    new, st = refit_subscales(W, H, res.codes, res.grid, spec, name="t")
    validate(res.codes, new, spec, "t")
    r_plain, r_new = (_rows(W, H, res.codes, g, spec) for g in (plain, new))
    assert np.all(r_new <= r_plain)
    if gains:
        assert st["refit_sub_rows"] > 0.5 and r_new.sum() < 0.99 * r_plain.sum()


def test_other_grids_get_the_plain_refit(rng):
    spec = METHOD_SPECS["w3g128a"]
    W, H = layer(rng, 8, 512)
    res = gptq_quantize(W, H, spec)
    a, sa = refit_scales(W, H, res.codes, res.grid, spec)
    b, sb = refit_subscales(W, H, res.codes, res.grid, spec)
    assert sa == sb
    assert all(np.array_equal(v, b.arrays()[k]) for k, v in a.arrays().items())


def test_rounds_with_sub_are_deterministic_and_record_it(rng):
    spec = SUPER_SPECS["q3_k"]
    W, H = layer(rng, 8, 512)
    res = gptq_quantize(W, H, spec, actorder=True)
    runs = [refit_rounds(W, H, res.codes, res.grid, spec, 2, sub=True) for _ in range(2)]
    _, _, plain = refit_rounds(W, H, res.codes, res.grid, spec, 2)
    (c1, g1, s1), (c2, g2, _) = runs
    assert s1["refit_sub"] is True and "refit_sub" not in plain
    assert s1["objective"] < plain["objective"]
    assert np.array_equal(c1, c2)
    assert all(np.array_equal(v, g2.arrays()[k]) for k, v in g1.arrays().items())


@pytest.mark.parametrize("kw,match", [({"method": "leanquant", "refit_sub": True}, "add --refit"),
                                      ({"method": "tesseraq", "refit_sub": True, "refit": 1},
                                       "tunes its scales")])
def test_pipeline_refuses_refit_sub(kw, match):
    with pytest.raises(UnsupportedError, match=match):
        dataclasses.replace(QuantizeOptions(calib="x"), **kw).check()
