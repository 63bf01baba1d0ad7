"""The LeanQuant_aff span searches: valid, exactly representable grids that never lose to
min-max on the weighted span objective, and GGUF blocks that gguf-py decodes to our values."""
from __future__ import annotations

import numpy as np
import pytest

from qexport.grids import (GridKind, GridSpec, ZeroDomain, concat_grids, dequantize,
                           fit_minmax, validate)
from qexport.grids import quantize_nearest
from qexport.methods.grid_search import search_span, span_error
from qexport.methods.leanquant import leanquant_aff_quantize
from qexport.methods.superblock_search import search_superblock
from qexport.testing.specs import IQ4_TABLE, SUPER_SPECS

SPAN_SPECS = {
    "sym4": GridSpec.affine(4, 64, True),
    "sym2": GridSpec.affine(2, 64, True),
    "asym3": GridSpec.affine(3, 64, False),
    "fmin4": GridSpec.affine(4, 64, False, zero=ZeroDomain.FLOAT),
    "iq4_nl": GridSpec(name="iq4_nl-like", kind=GridKind.CODEBOOK, bits=4, group_size=64,
                       table=IQ4_TABLE),
}



def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Heavy-tailed rows plus the hard cases: all zero, constant, one outlier, all negative."""
    W = (rng.standard_t(3, (12, n)) * 0.03).astype(np.float32)
    W[0] = 0
    W[1] = 0.5
    W[2, 3] = 4.0
    W[3] = -np.abs(W[3])
    return W


def _check(spec: GridSpec, grid, W: np.ndarray, s: np.ndarray) -> None:
    codes = quantize_nearest(spec, grid, W, 0, span=W.shape[1])
    validate(codes, grid, spec, "span")
    mm = fit_minmax(spec, W)
    for r in range(W.shape[0]):        # per row: never worse than min-max (1 ulp of slack)
        e, e_mm = span_error(spec, _row(grid, r), W[r:r + 1], s), \
            span_error(spec, _row(mm, r), W[r:r + 1], s)
        assert e <= e_mm * (1 + 1e-5) + 1e-30, f"{spec.name} row {r}: {e} > min-max {e_mm}"


def _row(grid, r):
    return type(grid)(**{k: v[r:r + 1] for k, v in grid.arrays().items()})


@pytest.mark.parametrize("key", sorted(SPAN_SPECS))
@pytest.mark.parametrize("n", [64, 40])                     # full and ragged span
def test_span_search_valid_and_not_worse_than_minmax(rng, key, n):
    spec = SPAN_SPECS[key]
    W = _rows(rng, n)
    s = np.exp(2 * rng.standard_normal(n)).astype(np.float32)
    s[:3] = 0
    g = search_span(spec, W, s)
    _check(spec, g, W, s)
    total = sum(span_error(spec, _row(g, r), W[r:r + 1], s) for r in range(12))
    total_mm = sum(span_error(spec, _row(fit_minmax(spec, W), r), W[r:r + 1], s)
                   for r in range(12))
    assert total < 0.95 * total_mm                          # the search does something


@pytest.mark.parametrize("key", sorted(SUPER_SPECS))
def test_superblock_search_valid_and_not_worse_than_minmax(rng, key):
    spec = SUPER_SPECS[key]
    W = _rows(rng, 256)
    s = np.exp(2 * rng.standard_normal(256)).astype(np.float32)
    g = search_superblock(spec, W, s)
    assert g.sc.dtype == np.int16 and g.d.shape == (12, 1)
    _check(spec, g, W, s)
    total = sum(span_error(spec, _row(g, r), W[r:r + 1], s) for r in range(12))
    total_mm = sum(span_error(spec, _row(fit_minmax(spec, W), r), W[r:r + 1], s)
                   for r in range(12))
    assert total < 0.95 * total_mm


def test_search_without_weights_is_unweighted(rng):
    W = _rows(rng, 64)
    spec = SPAN_SPECS["asym3"]
    a = search_span(spec, W, None)
    b = search_span(spec, W, np.full(64, 7.0, dtype=np.float32))
    c = search_span(spec, W, np.zeros(64, dtype=np.float32))      # all-dead span
    for k in a.arrays():
        assert np.array_equal(a.arrays()[k], b.arrays()[k])
        assert np.array_equal(a.arrays()[k], c.arrays()[k])


GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_packer_accepts_and_gguf_py_decodes_our_values(rng, type_name):
    gguf = pytest.importorskip("gguf")
    from qexport.backends.gguf.pack import pack_tensor
    from qexport.backends.gguf.types import gguf_type, spec_for
    spec = spec_for(type_name)
    X = rng.standard_normal((512, 256)) * np.exp(rng.standard_normal(256))
    H = (2.0 / 512 * X.T @ X).astype(np.float32)
    W = (rng.standard_t(4, (8, 256)) * 0.02).astype(np.float32)
    res = leanquant_aff_quantize(W, H, spec, name="blk.0.w")
    raw = pack_tensor(res.codes, res.grid, spec, name="blk.0.w")
    deq = gguf.quants.dequantize(raw, gguf_type(type_name).ggml_type).reshape(8, 256)
    assert np.array_equal(deq.astype(np.float32), res.dequantize())


def test_superblock_spans_concatenate(rng):
    """A 512-wide W has two 256-column spans; their grids concatenate into a valid grid."""
    spec = SUPER_SPECS["q4_k"]
    W = _rows(rng, 512)
    grids = [search_superblock(spec, W[:, c:c + 256], None) for c in (0, 256)]
    g = concat_grids(grids)
    codes = np.concatenate([quantize_nearest(spec, gg, W[:, c:c + 256], 0, span=256)
                            for gg, c in zip(grids, (0, 256))], axis=1)
    validate(codes, g, spec, "t")
    assert dequantize(codes, g, spec).shape == (12, 512)


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q5_0", "Q8_0"])
def test_gguf_sym_search_uses_signed_d_and_beats_positive_only(gguf_type: str) -> None:
    """On GGUF's signed-d legacy types the search also tries llama.cpp's d = extreme / lowest
    level: never worse than the positive-only search (same spec under another name), some
    blocks pick a negative d, all-zero blocks stay exact, and gguf-py decodes our values."""
    import dataclasses

    import gguf

    from qexport.backends.gguf.pack import pack_tensor
    from qexport.backends.gguf.types import spec_for
    rng = np.random.default_rng(3)
    spec = spec_for(gguf_type)
    W = (rng.standard_normal((64, 32)) * rng.uniform(0.01, 2, (64, 1))).astype(np.float32)
    W[3] = 0.0                                       # one span = one 32-column block
    w = rng.uniform(0.1, 1.0, 32).astype(np.float32)
    g = search_span(spec, W, w)
    pos = search_span(dataclasses.replace(spec, name="positive-only"), W, w)
    assert span_error(spec, g, W, w) <= span_error(spec, pos, W, w)
    assert (g.scales < 0).any() and (pos.scales > 0).all()
    codes = quantize_nearest(spec, g, W, 0)
    validate(codes, g, spec, "w")
    deq = dequantize(codes, g, spec)
    assert np.all(deq[3] == 0)
    blob = pack_tensor(codes, g, spec, "w")
    ref = gguf.quants.dequantize(blob, gguf.GGMLQuantizationType[gguf_type])
    assert np.array_equal(ref.reshape(W.shape).astype(np.float32), deq)
