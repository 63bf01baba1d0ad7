"""LeanQuant (nu and aff) on LLM-like layers: exact grids, GGUF-packable output, plain k-means
inside GPTQ at p=0, and a lower layer objective than min-max GPTQ (which beats RTN)."""
from __future__ import annotations

import numpy as np
import pytest

from qexport.errors import InputError, UnsupportedError
from qexport.grids import CodebookGrid, GridKind, GridSpec, ZeroDomain, round_to_dtype, validate
from qexport.methods import gptq_quantize, hessian_objective, rtn_quantize
from qexport.methods.leanquant import leanquant_aff_quantize, leanquant_nu_quantize
from qexport.testing.specs import METHOD_SPECS

AFF_SPECS = {k: METHOD_SPECS[k] for k in ("w4g128s", "w3g128a", "q4_k", "iq4_nl")}


def free(bits: int, group: int = -1) -> GridSpec:
    return GridSpec(name=f"free{bits}g{group}", kind=GridKind.CODEBOOK, bits=bits,
                    group_size=group, free_codebook=True)


def llm_layer(rng: np.random.Generator, out_f: int = 64, in_f: int = 256, rank: int = 16,
              n: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed W and H = 2/N X^T X of correlated inputs with uneven channel scales and a
    few outlier channels (what makes inverse-Hessian diagonals uneven in real LLMs)."""
    scale = np.exp(0.8 * rng.standard_normal(in_f))
    scale[rng.choice(in_f, 4, replace=False)] *= 8
    X = (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, in_f)) / np.sqrt(rank)
         + 0.3 * rng.standard_normal((n, in_f))) * scale
    W = (rng.standard_t(4, (out_f, in_f)) * 0.02).astype(np.float32)
    return W, (2.0 / n * X.T @ X).astype(np.float32)


@pytest.mark.parametrize("key", sorted(AFF_SPECS))
def test_aff_beats_minmax_gptq_which_beats_rtn(rng, key):
    spec = AFF_SPECS[key]
    W, H = llm_layer(rng)
    res = leanquant_aff_quantize(W, H, spec, name="l.w")
    validate(res.codes, res.grid, spec, "l.w")
    obj = hessian_objective(W, res.dequantize(), H)
    assert obj == pytest.approx(res.stats["objective"])
    gptq = gptq_quantize(W, H, spec, percdamp=0.1).stats["objective"]
    rtn = hessian_objective(W, rtn_quantize(W, spec).dequantize(), H)
    assert gptq < rtn
    assert obj < 0.9 * gptq, f"{key}: LeanQuant_aff {obj:.4g} vs GPTQ {gptq:.4g}"
    assert res.stats["method"] == "leanquant_aff" and res.stats["search_calls"] >= 1


@pytest.mark.parametrize("key", ["w3g128a", "q4_k"])
def test_aff_with_actorder_and_static_groups(rng, key):
    spec = AFF_SPECS[key]
    W, H = llm_layer(rng)
    res = leanquant_aff_quantize(W, H, spec, actorder=True)
    validate(res.codes, res.grid, spec, "t")
    assert res.stats["static_groups"] is True
    gptq = gptq_quantize(W, H, spec, percdamp=0.1, actorder=True).stats["objective"]
    assert res.stats["objective"] < gptq


def test_aff_per_channel_ragged_and_float_min(rng):
    W, H = llm_layer(rng, 32, 200)                      # 200 = 128 + ragged 72
    for spec in (GridSpec.affine(3, -1, False), GridSpec.affine(4, 128, False),
                 GridSpec.affine(4, 64, False, zero=ZeroDomain.FLOAT)):
        res = leanquant_aff_quantize(W, H, spec)
        validate(res.codes, res.grid, spec, "t")
        assert res.stats["objective"] < gptq_quantize(W, H, spec, percdamp=0.1
                                                      ).stats["objective"]


def _sklearn_tables(W: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    vals = []
    for row in W.astype(np.float64):
        init = np.linspace(row.min(), row.max(), k)[:, None]
        km = KMeans(k, init=init, n_init=1, max_iter=100, tol=1e-6)
        vals.append(km.fit(row[:, None], sample_weight=alive).cluster_centers_[:, 0])
    return np.sort(round_to_dtype(np.array(vals, dtype=np.float32), "fp16"), axis=1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nu_p0_uniform_is_plain_kmeans_inside_gptq(rng):
    pytest.importorskip("sklearn")
    W, H = llm_layer(rng, 24, 96)
    H[7, :] = 0
    H[:, 7] = 0                                          # a dead column: weight 0, W zeroed
    spec = free(3)
    res = leanquant_nu_quantize(W, H, spec, p=0.0, init="uniform")
    Wd = W.copy()
    Wd[:, 7] = 0
    alive = np.ones(96)
    alive[7] = 0
    table = CodebookGrid(values=_sklearn_tables(Wd, alive, 8)[:, None, :])
    ref = gptq_quantize(W, H, spec, percdamp=0.1, actorder=True,
                        fitter=lambda *_: table)
    assert np.array_equal(res.grid.values, table.values)
    assert np.array_equal(res.codes, ref.codes)
    assert res.stats["objective"] == ref.stats["objective"]
    assert res.stats["method"] == "leanquant_nu" and res.stats["init"] == "uniform"


def test_nu_beats_gptq_on_the_same_codebook_and_weighting_helps(rng):
    W, H = llm_layer(rng)
    for bits in (3, 4):
        spec = free(bits)
        lq = leanquant_nu_quantize(W, H, spec)                    # p=4, auto init
        validate(lq.codes, lq.grid, spec, "t")
        vals = lq.grid.values
        assert np.all(np.diff(vals, axis=-1) >= 0)
        assert np.array_equal(round_to_dtype(vals, "fp16"), vals)
        gptq = gptq_quantize(W, H, spec, percdamp=0.1, actorder=True).stats["objective"]
        assert lq.stats["objective"] < 0.6 * gptq
        if bits == 4:
            p0 = leanquant_nu_quantize(W, H, spec, p=0.0).stats["objective"]
            assert lq.stats["objective"] < p0


def test_nu_per_group_tables_optimal_and_qtensor(rng):
    W, H = llm_layer(rng, 16, 96)
    spec = free(2, 32)
    res = leanquant_nu_quantize(W, H, spec, actorder=False)
    assert res.grid.values.shape == (16, 3, 4)
    qt = res.to_qtensor("m.w")
    assert np.array_equal(qt.dequantize(), res.dequantize())
    opt = leanquant_nu_quantize(W, H, spec, optimal=True)
    validate(opt.codes, opt.grid, spec, "t")
    assert opt.stats["init"] == "optimal"
    import json
    json.dumps(res.stats)


def test_errors(rng):
    W, H = llm_layer(rng, 8, 64)
    with pytest.raises(UnsupportedError, match="l.q.*free-codebook"):
        leanquant_nu_quantize(W, H, GridSpec.affine(4, 32, True), name="l.q")
    with pytest.raises(UnsupportedError, match="l.q.*leanquant_nu"):
        leanquant_aff_quantize(W, H, free(3), name="l.q")
    with pytest.raises(InputError, match="init"):
        leanquant_nu_quantize(W, H, free(3), init="random")
    with pytest.raises(InputError, match="grid"):
        leanquant_aff_quantize(W, H, GridSpec.affine(4, 32, True), grid_points=1)
