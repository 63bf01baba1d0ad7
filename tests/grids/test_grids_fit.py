"""fit_minmax -> quantize_nearest -> validate -> dequantize, over every grid family.

Independent checks (no fit code reused): the chosen code is the nearest representable value
(levels obtained by decoding constant code planes with ``dequantize``), ``dequantize`` equals
``dequantize_span`` per span, and hand formulas for zero / constant groups.
"""
from __future__ import annotations

import numpy as np
import pytest

from qexport.grids import (AffineGrid, GridSpec, dequantize, dequantize_span, fit_minmax,
                           quantize_nearest, round_to_dtype, validate)

from qexport.testing.specs import CODEBOOK_SPECS, SUPER_SPECS, affine_spec, rtn, span_of

GROUPS = [(32, 128), (128, 256), (-1, 77), (40, 96)]      # (group size, in_features)


def _levels(spec: GridSpec, grid, shape: tuple[int, int]) -> np.ndarray:
    """float32 [K, out, in]: the value of every code at every position."""
    return np.stack([dequantize(np.full(shape, c, np.uint8), grid, spec)
                     for c in range(spec.maxq + 1)])


def _check_roundtrip(spec: GridSpec, W: np.ndarray, affine: bool) -> np.ndarray:
    codes, grid, grids = rtn(spec, W)
    validate(codes, grid, spec, "w")
    deq = dequantize(codes, grid, spec)
    assert deq.dtype == np.float32 and deq.shape == W.shape
    L = span_of(spec, W.shape[1])
    for k, g in enumerate(grids):
        c0 = k * L
        blk = codes[:, c0:c0 + L]
        part = dequantize_span(spec, g, blk, 0, span=blk.shape[1])
        assert np.array_equal(part, deq[:, c0:c0 + blk.shape[1]]), f"span {k}"
    lv = _levels(spec, grid, W.shape)
    best = np.abs(lv - W[None]).min(axis=0)
    err = np.abs(deq - W)
    # affine rounds w/scale (GPTQ's rule): ties and fp32 division may pick the other
    # neighbour of an exact midpoint only; the others pick the nearest level exactly
    slack = 1e-5 * np.abs(lv).max() if affine else 0.0
    bad = err > best + slack
    assert not bad.any(), f"{int(bad.sum())} codes not nearest; worst {(err - best).max()}"
    return deq


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("zero", ["sym", "asym", "fmin"])
@pytest.mark.parametrize("group,in_f", GROUPS)
def test_affine_roundtrip(rng, bits, zero, group, in_f):
    spec = affine_spec(bits, zero, group)
    for out_f in (1, 17):
        W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
        deq = _check_roundtrip(spec, W, affine=True)
        # min-max grids never clip by more than one step: error <= scale (half a step
        # except at the symmetric grid's short positive end)
        _, grid, _ = rtn(spec, W)
        L = spec.group_len(in_f)
        s = np.repeat(grid.scales, L, axis=1)[:, :in_f]
        assert np.all(np.abs(deq - W) <= s * 1.0001 + 1e-12)


@pytest.mark.parametrize("key", sorted(SUPER_SPECS) + sorted(CODEBOOK_SPECS))
@pytest.mark.parametrize("out_f,in_f", [(3, 256), (5, 512)])
def test_superblock_codebook_roundtrip(rng, key, out_f, in_f):
    spec = SUPER_SPECS.get(key) or CODEBOOK_SPECS[key]
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    deq = _check_roundtrip(spec, W, affine=False)
    rel = np.linalg.norm(deq - W) / np.linalg.norm(W)
    assert rel < {2: 0.6, 3: 0.35}.get(spec.bits, 0.2), rel


def test_codebook_ragged_group(rng):
    spec = CODEBOOK_SPECS["iq4_nl"]
    W = (rng.standard_normal((4, 80)) * 0.05).astype(np.float32)   # 32 + 32 + 16
    codes, grid, _ = rtn(spec, W)
    assert grid.scales.shape == (4, 3)
    validate(codes, grid, spec, "w")


ALL = [affine_spec(b, z, g) for b in (2, 4, 8) for z in ("sym", "asym", "fmin")
       for g in (32, -1)] + list(SUPER_SPECS.values()) + list(CODEBOOK_SPECS.values())


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name + str(s.zero.value))
def test_zero_and_constant_groups(spec):
    in_f = 256
    W = np.zeros((4, in_f), np.float32)
    W[1] = 0.3                                           # constant positive row
    W[2] = -0.7                                          # constant negative row
    W[3, :32] = 1.5                                      # one constant group, rest zero
    codes, grid, _ = rtn(spec, W)
    validate(codes, grid, spec, "w")
    deq = dequantize(codes, grid, spec)
    assert np.all(np.isfinite(deq))
    assert np.array_equal(deq[0], np.zeros(in_f, np.float32)), "zero row must stay exactly 0"
    if spec.kind.value == "affine":
        assert np.all(deq[3, 32:] == 0)                  # zero groups beside a nonzero one
    for r, v in ((1, 0.3), (2, -0.7)):
        err = np.abs(deq[r] - v).max()
        assert err <= abs(v) * (0.5 if spec.bits == 2 else 0.2), (r, err)


@pytest.mark.parametrize("spec", [affine_spec(b, z, 32) for b in (2, 4, 8)
                                  for z in ("sym", "asym", "fmin")]
                         + [SUPER_SPECS["q4_k"], SUPER_SPECS["q6_k"], CODEBOOK_SPECS["iq4_nl"]],
                         ids=lambda s: s.name + str(s.zero.value))
@pytest.mark.parametrize("mag", [1e-6, 6e4])
def test_extreme_scales(rng, spec, mag):
    """Tiny (fp16 subnormal scales) and huge (near fp16 max) weights: still valid, finite,
    nearest-code; huge weights keep a relative error like normal ones."""
    W = (rng.uniform(-1, 1, (3, 256)) * mag).astype(np.float32)
    deq = _check_roundtrip(spec, W, affine=spec.kind.value == "affine")
    assert np.all(np.isfinite(deq))
    rel = np.linalg.norm(deq - W) / np.linalg.norm(W)
    if mag > 1:
        assert rel < {2: 0.6}.get(spec.bits, 0.25), rel
    else:
        assert rel <= 1.0 + 1e-6, rel       # never worse than rounding everything to 0


def test_fit_scales_are_fp16_rounded_minmax(rng):
    """Asymmetric INT grid: scale = fp16((max - min)/maxq), zero = rint(-min/scale)."""
    W = (rng.standard_normal((6, 64)) * 0.1 + 0.02).astype(np.float32)
    spec = affine_spec(4, "asym", 32)
    g = fit_minmax(spec, W)
    assert isinstance(g, AffineGrid)
    for k in range(2):
        blk = W[:, 32 * k:32 * (k + 1)].astype(np.float64)
        lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
        s = round_to_dtype(((hi - lo) / 15).astype(np.float32), "fp16")
        assert np.array_equal(g.scales[:, k], s)
        assert np.array_equal(g.zeros[:, k], np.rint(-lo.astype(np.float32) / s).astype(np.uint8))


def test_quantize_nearest_col0_addresses_groups(rng):
    """Quantizing one column at a time with col0 equals quantizing the span at once."""
    spec = affine_spec(4, "asym", 16)
    W = (rng.standard_normal((5, 48)) * 0.1).astype(np.float32)
    g = fit_minmax(spec, W)
    whole = quantize_nearest(spec, g, W, 0, span=48)
    cols = np.concatenate([quantize_nearest(spec, g, W[:, j:j + 1], j, span=48)
                           for j in range(48)], axis=1)
    assert np.array_equal(whole, cols)
    q = SUPER_SPECS["q3_k"]
    W2 = (rng.standard_normal((2, 256)) * 0.1).astype(np.float32)
    g2 = fit_minmax(q, W2)
    whole2 = quantize_nearest(q, g2, W2, 0, span=256)
    part = quantize_nearest(q, g2, W2[:, 100:130], 100, span=256)
    assert np.array_equal(whole2[:, 100:130], part)
