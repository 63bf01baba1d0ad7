"""Scale re-fit (``--refit``): the re-fitted floats are the Hessian least-squares optimum (checked
against a dense solve built from the reference decoder itself), a re-fit never raises a row's
objective, the result satisfies the spec, and the pipeline refuses it where it does not apply."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qexport.errors import UnsupportedError
from qexport.grids import GridKind, GridSpec, ZeroDomain, dequantize, validate
from qexport.grids.grid import grid_from_arrays
from qexport.methods import gptq_quantize
from qexport.methods.refit import refit_rounds, refit_scales
from qexport.methods.result import hessian_objective
from qexport.pipeline import QuantizeOptions
from qexport.testing.layers import correlated_layer as layer
from qexport.testing.specs import CODEBOOK_SPECS, METHOD_SPECS, SUPER_SPECS

SPECS = {**METHOD_SPECS, "q2_k": SUPER_SPECS["q2_k"], "q3_k": SUPER_SPECS["q3_k"],
         "q4_0": GridSpec.affine(4, 32, True, name="q4_0-like"),
         "q4_1": GridSpec.affine(4, 32, False, zero=ZeroDomain.FLOAT, name="q4_1-like"),
         "w4g96a": GridSpec.affine(4, 96, False)}        # ragged last group at 512 columns


def _float_names(grid) -> list[str]:
    return [k for k in grid.arrays() if k in ("scales", "mins", "d", "dmin")]


def _dense_optimum(W, H, codes, grid, spec):
    """Oracle: the basis of every float parameter decoded by grids.dequantize (that parameter 1,
    the other floats 0), then one dense weighted least-squares solve per row (float64)."""
    names = _float_names(grid)
    arrays = grid.arrays()
    Hd = H.astype(np.float64)
    out = {k: np.zeros_like(arrays[k], dtype=np.float64) for k in names}
    for r in range(W.shape[0]):
        cols = []
        for k in names:
            for g in range(arrays[k].shape[1]):
                unit = {n: (np.zeros_like(v) if n in names else v[r:r + 1])
                        for n, v in arrays.items()}
                unit[k][0, g] = 1.0
                cols.append(dequantize(codes[r:r + 1], grid_from_arrays(grid.kind, unit),
                                       spec)[0].astype(np.float64))
        B = np.stack(cols, axis=1)                            # [in, P]
        theta = np.linalg.lstsq(B.T @ Hd @ B, B.T @ Hd @ W[r].astype(np.float64), rcond=None)[0]
        i = 0
        for k in names:
            n = arrays[k].shape[1]
            out[k][r] = theta[i:i + n]
            i += n
    return out


@pytest.mark.parametrize("key", ["q4_0", "q4_1", "w3g128a", "q4_k", "q3_k", "iq4_nl", "w4g96a"])
def test_refit_is_the_least_squares_optimum(rng, key):
    spec = dataclasses.replace(SPECS[key], scale_dtype="fp32")      # no rounding of the optimum
    in_f = 512
    W, H = layer(rng, 6, in_f)
    res = gptq_quantize(W, H, spec)
    new, stats = refit_scales(W, H, res.codes, res.grid, spec)
    want = _dense_optimum(W, H, res.codes, res.grid, spec)
    assert stats["refit_rows"] == 1.0
    for k, v in want.items():
        np.testing.assert_allclose(new.arrays()[k], v, rtol=2e-4, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("key", sorted(SPECS))
def test_refit_never_worse_per_row_and_satisfies_spec(rng, key):
    spec = SPECS[key]
    W, H = layer(rng, 16, 512)
    res = gptq_quantize(W, H, spec, actorder=True)
    new, stats = refit_scales(W, H, res.codes, res.grid, spec, name="t")
    validate(res.codes, new, spec, "t")
    E0 = W.astype(np.float64) - res.dequantize()
    E1 = W.astype(np.float64) - dequantize(res.codes, new, spec)
    r0 = np.einsum("ij,ij->i", E0 @ H, E0)
    r1 = np.einsum("ij,ij->i", E1 @ H, E1)
    assert np.all(r1 <= r0)
    assert stats["refit_gain"] < 0.999          # GPTQ's min-max / searched scales are not optimal
    for k in res.grid.arrays():                 # integer fields untouched
        if k not in _float_names(res.grid):
            assert np.array_equal(res.grid.arrays()[k], new.arrays()[k])


def test_weights_on_the_grid_are_a_fixed_point(rng):
    spec = SPECS["q4_k"]
    W, H = layer(rng, 8, 256)
    res = gptq_quantize(W, H, spec)
    Wq = res.dequantize()
    new, stats = refit_scales(Wq, H, res.codes, res.grid, spec)
    assert stats["refit_rows"] == 0.0
    for k, v in res.grid.arrays().items():
        assert np.array_equal(v, new.arrays()[k])


@pytest.mark.parametrize("key", ["q4_0", "q4_k", "w3g128a"])
def test_rounds_keep_the_best_and_are_deterministic(rng, key):
    spec = SPECS[key]
    W, H = layer(rng, 16, 512)
    res = gptq_quantize(W, H, spec, actorder=True)
    base = hessian_objective(W, res.dequantize(), H)
    c1, g1, s1 = refit_rounds(W, H, res.codes, res.grid, spec, 1, actorder=True)
    c3, g3, s3 = refit_rounds(W, H, res.codes, res.grid, spec, 3, actorder=True)
    c3b, g3b, _ = refit_rounds(W, H, res.codes, res.grid, spec, 3, actorder=True)
    assert s3["objective"] <= s1["objective"] < base
    assert np.isclose(hessian_objective(W, dequantize(c3, g3, spec), H), s3["objective"],
                      rtol=1e-5)
    assert np.array_equal(c3, c3b)
    assert all(np.array_equal(v, g3b.arrays()[k]) for k, v in g3.arrays().items())
    validate(c3, g3, spec, "t")


def test_free_codebook_refused(rng):
    spec = CODEBOOK_SPECS["free2"]
    W, H = layer(rng, 4, 64)
    codes = np.zeros((4, 64), np.uint8)
    grid = grid_from_arrays(GridKind.CODEBOOK, {"values": np.zeros((4, 1, 4), np.float32)})
    with pytest.raises(UnsupportedError, match="free codebook"):
        refit_scales(W, H, codes, grid, spec, name="blk.0.w")


@pytest.mark.parametrize("method,match", [("rtn", "not rtn"), ("leanquant-nu", "not leanquant-nu"),
                                          ("tesseraq", "tunes its scales")])
def test_pipeline_refuses_refit_where_it_does_not_apply(method, match):
    opts = QuantizeOptions(method=method, calib="x.txt", refit=1)
    with pytest.raises(UnsupportedError, match=match):
        opts.check()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_pipeline_refit_value_checked(bad):
    with pytest.raises(UnsupportedError, match="--refit expected"):
        QuantizeOptions(method="gptq", calib="x.txt", refit=bad).check()
