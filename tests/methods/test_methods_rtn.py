"""RTN onto GridSpecs, against hand-written numpy formulas (no qexport.grids code)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.grids import GridKind, GridSpec, ZeroDomain, validate
from qexport.methods import rtn_quantize


def _groups(W: np.ndarray, g: int) -> list[np.ndarray]:
    return [W[:, c:c + g] for c in range(0, W.shape[1], g)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g,in_f", [(32, 128), (40, 96), (-1, 77)])
def test_rtn_sym_matches_formula(rng, bits, g, in_f):
    W = (rng.standard_normal((9, in_f)) * 0.1).astype(np.float32)
    spec = GridSpec.affine(bits, g, True)
    res = rtn_quantize(W, spec, name="t")
    validate(res.codes, res.grid, spec, "t")
    maxq, off = 2 ** bits - 1, 2 ** (bits - 1)
    want_codes, want_vals = [], []
    for blk in _groups(W, in_f if g == -1 else g):
        s = (2 * np.abs(blk).max(axis=1, keepdims=True) / maxq).astype(np.float16)
        s = s.astype(np.float32)
        q = np.clip(np.rint(blk / s) + off, 0, maxq)
        want_codes.append(q.astype(np.uint8))
        want_vals.append(s * (q - off))
    assert np.array_equal(res.codes, np.concatenate(want_codes, axis=1))
    assert np.array_equal(res.dequantize(), np.concatenate(want_vals, axis=1).astype(np.float32))


@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_asym_matches_formula(rng, bits):
    W = (rng.standard_normal((7, 96)) * 0.1 + 0.03).astype(np.float32)
    spec = GridSpec.affine(bits, 40, False)                # ragged: 40 + 40 + 16
    res = rtn_quantize(torch.from_numpy(W), spec)
    maxq = 2 ** bits - 1
    for k, blk in enumerate(_groups(W, 40)):
        lo = np.minimum(blk.min(axis=1), 0)
        hi = np.maximum(blk.max(axis=1), 0)
        s = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
        z = np.rint(-lo / s)
        assert np.array_equal(res.grid.scales[:, k], s)
        assert np.array_equal(res.grid.zeros[:, k], z.astype(np.uint8))
        q = np.clip(np.rint(blk / s[:, None]) + z[:, None], 0, maxq)
        assert np.array_equal(res.codes[:, 40 * k:40 * k + blk.shape[1]], q.astype(np.uint8))
    assert res.grid.scales.shape == (7, 3)


def test_rtn_superblock_and_codebook_are_valid_and_close(rng):
    W = (rng.standard_normal((6, 512)) * 0.05).astype(np.float32)
    q4k = GridSpec(name="q4_k-like", kind=GridKind.SUPERBLOCK, bits=4, group_size=32,
                   super_size=256, zero=ZeroDomain.FLOAT, sub_scale_range=(0, 63),
                   sub_min_range=(0, 63), row_multiple=256)
    iq4 = GridSpec(name="iq4_nl-like", kind=GridKind.CODEBOOK, bits=4, group_size=32,
                   table=(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113))
    for spec, tol in ((q4k, 0.15), (iq4, 0.15)):
        res = rtn_quantize(W, spec, name="t")
        validate(res.codes, res.grid, spec, "t")
        rel = np.linalg.norm(res.dequantize() - W) / np.linalg.norm(W)
        assert rel < tol, (spec.name, rel)
    assert rtn_quantize(W, q4k).grid.d.shape == (6, 2)


def test_rtn_stats_and_qtensor(rng):
    W = rng.standard_normal((4, 64)).astype(np.float32)
    res = rtn_quantize(W, GridSpec.affine(4, 32, True))
    assert res.stats["method"] == "rtn"
    qt = res.to_qtensor("m.w")
    qt.validate()
    assert qt.name == "m.w" and np.array_equal(qt.dequantize(), res.dequantize())
