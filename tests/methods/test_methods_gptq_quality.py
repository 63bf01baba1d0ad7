"""GPTQ onto every grid kind: lower objective than RTN, exact codes, act-order un-permuted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.errors import InputError, LoweringError
from qexport.grids import GridKind, GridSpec, dequantize, validate
from qexport.ir import QTensor
from qexport.methods import gptq_quantize, hessian_objective, rtn_quantize
from qexport.testing.specs import METHOD_SPECS

SPECS = {**METHOD_SPECS,
         "free3": GridSpec(name="free-codebook", kind=GridKind.CODEBOOK, bits=3,
                           group_size=-1, free_codebook=True)}


def correlated_layer(rng: np.random.Generator, out_f: int = 64, in_f: int = 256,
                     rank: int = 8, n: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """W [out, in] and H = 2/N X^T X for inputs with a strong rank-``rank`` covariance."""
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    X = (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, in_f))) * 2 \
        + 0.1 * rng.standard_normal((n, in_f))
    return W, (2.0 / n * X.T @ X).astype(np.float32)


@pytest.mark.parametrize("key", sorted(SPECS))
@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(rng, key, actorder):
    spec = SPECS[key]
    W, H = correlated_layer(rng)
    res = gptq_quantize(W, H, spec, name="layer.w", actorder=actorder)
    rtn = rtn_quantize(W, spec, name="layer.w")
    validate(res.codes, res.grid, spec, "layer.w")
    obj_rtn = hessian_objective(W, rtn.dequantize(), H)
    obj = res.stats["objective"]
    assert obj == pytest.approx(hessian_objective(W, res.dequantize(), H))
    assert obj < 0.5 * obj_rtn, f"{key}: GPTQ objective {obj} not well below RTN {obj_rtn}"
    # the weights stay a sane approximation of W (not only of its dominant subspace)
    rel = np.linalg.norm(res.dequantize() - W) / np.linalg.norm(W)
    rel_rtn = np.linalg.norm(rtn.dequantize() - W) / np.linalg.norm(W)
    assert rel < 1.5 * rel_rtn + 0.02


def test_actorder_per_channel_is_gptq_on_permuted_columns(rng):
    """Act-order = plain GPTQ on (W[:, perm], H[perm][:, perm]), codes un-permuted after."""
    W, H = correlated_layer(rng, 32, 96)
    d = np.exp(rng.standard_normal(96))                    # uneven diag(H): a real order
    H = (H.astype(np.float64) * d[None, :] * d[:, None]).astype(np.float32)
    spec = GridSpec.affine(4, -1, False)
    act = gptq_quantize(W, H, spec, actorder=True)
    perm = torch.argsort(torch.diagonal(torch.from_numpy(H)), descending=True,
                         stable=True).numpy()
    plain = gptq_quantize(W[:, perm], H[perm][:, perm], spec)
    assert not np.array_equal(perm, np.arange(96))
    assert np.array_equal(act.codes[:, perm], plain.codes)
    assert np.array_equal(act.grid.scales, plain.grid.scales)
    assert np.array_equal(act.dequantize()[:, perm], plain.dequantize())


def test_actorder_with_ragged_groups_and_superblocks(rng):
    W, H = correlated_layer(rng, 40, 512)
    for spec in (GridSpec.affine(4, 96, False), SPECS["q4_k"]):   # 512 = 5*96 + 32 ragged
        res = gptq_quantize(W, H, spec, actorder=True, blocksize=64)
        validate(res.codes, res.grid, spec, "t")
        assert res.stats["static_groups"] is True
        assert res.stats["objective"] < hessian_objective(W, rtn_quantize(W, spec).dequantize(),
                                                          H)
        assert np.linalg.norm(res.dequantize() - W) / np.linalg.norm(W) < 0.25


def test_result_is_exact_on_stored_grid_and_to_qtensor(rng):
    W, H = correlated_layer(rng, 16, 256)
    res = gptq_quantize(torch.from_numpy(W), torch.from_numpy(H), SPECS["q4_k"], name="x.w")
    assert res.codes.dtype == np.uint8 and res.codes.shape == (16, 256)
    qt = res.to_qtensor("x.w")
    assert isinstance(qt, QTensor)
    qt.validate()
    assert np.array_equal(qt.dequantize(), dequantize(res.codes, res.grid, res.spec))
    for k in ("objective", "damp", "percdamp", "retries", "fp64", "static_groups",
              "dead_columns", "gptq_loss"):
        assert k in qt.stats
    import json
    json.dumps(qt.stats)                                   # stored in the IR manifest


def test_inputs_not_modified_and_dead_columns(rng):
    W, H = correlated_layer(rng, 16, 64)
    H[5, :] = 0
    H[:, 5] = 0
    W0, H0 = W.copy(), H.copy()
    res = gptq_quantize(W, H, GridSpec.affine(4, 32, True))
    assert np.array_equal(W, W0) and np.array_equal(H, H0)
    assert res.stats["dead_columns"] == 1
    assert np.all(res.dequantize()[:, 5] == 0)             # dead column quantized from 0


def test_shape_and_argument_errors(rng):
    W, H = correlated_layer(rng, 16, 192)
    with pytest.raises(LoweringError, match="layer.q.*256"):
        gptq_quantize(W, H, SPECS["q4_k"], name="layer.q")
    strict = GridSpec.affine(4, 128, True, ragged=False)
    with pytest.raises(LoweringError, match="layer.q.*group size 128"):
        gptq_quantize(W, H, strict, name="layer.q")
    with pytest.raises(LoweringError, match="layer.q"):
        rtn_quantize(W, strict, name="layer.q")
    with pytest.raises(InputError, match=r"layer.q: Hessian expected shape \[192, 192\]"):
        gptq_quantize(W, H[:64, :64], SPECS["w4g128s"], name="layer.q")
    with pytest.raises(InputError, match="group_fit"):
        gptq_quantize(W, H, SPECS["w4g128s"], group_fit="stale")
    with pytest.raises(InputError, match="blocksize"):
        gptq_quantize(W, H, SPECS["w4g128s"], blocksize=0)


@pytest.mark.parametrize("key", ["w3g128a", "q4_k", "iq4_nl"])
def test_gptq_on_grid_is_gptq_and_keeps_the_rounded_weights(rng, key):
    """On the grid static-group GPTQ fits, :func:`gptq_on_grid` makes the same codes, and they
    are the nearest codes of the weights it returns (each column as GPTQ rounded it)."""
    from qexport.grids import quantize_nearest
    from qexport.methods.gptq import gptq_on_grid
    spec = SPECS[key]
    W, H = correlated_layer(rng)
    d = np.exp(rng.standard_normal(W.shape[1]))           # uneven diag(H): a real act-order
    H = (H.astype(np.float64) * d[None, :] * d[:, None]).astype(np.float32)
    ref = gptq_quantize(W, H, spec, actorder=True, static_groups=True)
    codes, W_pre, rep = gptq_on_grid(W, H, spec, ref.grid, actorder=True)
    np.testing.assert_array_equal(codes, ref.codes)
    assert W_pre.dtype == np.float32 and W_pre.shape == W.shape
    np.testing.assert_array_equal(quantize_nearest(spec, ref.grid, W_pre, 0, W.shape[1]), codes)
    assert not np.array_equal(quantize_nearest(spec, ref.grid, W, 0, W.shape[1]), codes)
    assert rep["percdamp"] == 0.01
