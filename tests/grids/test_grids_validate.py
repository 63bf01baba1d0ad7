"""validate() rejects every kind of violation with a message naming the tensor and the field."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qexport.grids import (AffineGrid, CodebookGrid, GridError, SuperBlockGrid,
                           grid_from_arrays, validate)
from qexport.grids.spec import GridKind

from qexport.testing.specs import CODEBOOK_SPECS, SUPER_SPECS, affine_spec, rtn


def _fitted(rng, spec, shape=(4, 256)):
    W = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    codes, grid, _ = rtn(spec, W)
    validate(codes, grid, spec, "blk.0.w")                 # the untouched one is valid
    return codes, grid


def _replace(grid, **kw):
    return dataclasses.replace(grid, **kw)


def _reject(codes, grid, spec, match):
    with pytest.raises(GridError, match=match):
        validate(codes, grid, spec, "blk.0.w")


def test_codes_rejections(rng):
    spec = affine_spec(4, "asym", 32)
    codes, grid = _fitted(rng, spec)
    _reject(codes.astype(np.int32), grid, spec, r"blk.0.w.codes: expected a 2-D uint8")
    _reject(codes[0], grid, spec, r"blk.0.w.codes: expected a 2-D uint8 array \(not 1-D")
    bad = codes.copy()
    bad[2, 5] = 16
    _reject(bad, grid, spec, r"blk.0.w.codes: expected integers in \[0, 15\]")
    _reject(codes[:, :200], grid, spec, r"blk.0.w.scales: expected shape \[4, 7\]")


def test_affine_rejections(rng):
    spec = affine_spec(4, "asym", 32)
    codes, grid = _fitted(rng, spec)
    _reject(codes, _replace(grid, scales=grid.scales[:, :-1]), spec,
            r"blk.0.w.scales: expected shape \[4, 8\] \(not \[4, 7\]\)")
    s = grid.scales.copy()
    s[1, 2] = np.float32(0.1)                              # not an fp16 value
    _reject(codes, _replace(grid, scales=s), spec,
            r"blk.0.w.scales: expected values representable in fp16")
    s[1, 2] = np.nan
    _reject(codes, _replace(grid, scales=s), spec, r"blk.0.w.scales: expected finite")
    z = grid.zeros.copy()
    z[0, 0] = 16
    _reject(codes, _replace(grid, zeros=z), spec, r"blk.0.w.zeros: expected integers in \[0, 15\]")
    _reject(codes, _replace(grid, zeros=None), spec, r"blk.0.w: zero domain int expects zeros")
    _reject(codes, _replace(grid, scales=grid.scales.astype(np.float64)), spec,
            r"blk.0.w.scales: expected dtype float32 \(not float64\)")
    _reject(codes, _replace(grid, zeros=grid.zeros.astype(np.int32)), spec,
            r"blk.0.w.zeros: expected dtype uint8 \(not int32\)")
    fmin = affine_spec(4, "fmin", 32)
    codes2, grid2 = _fitted(rng, fmin)
    m = grid2.mins.copy()
    m[0, 0] = np.float32(1 / 3)
    _reject(codes2, _replace(grid2, mins=m), fmin, r"blk.0.w.mins: expected values representable")
    _reject(codes2, grid, fmin, r"zero domain float expects mins")
    sym = affine_spec(4, "sym", 32)
    _reject(codes, grid, sym, r"zero domain none expects no zero arrays")


def test_superblock_rejections(rng):
    spec = SUPER_SPECS["q4_k"]
    codes, grid = _fitted(rng, spec)
    sc = grid.sc.copy()
    sc[0, 3] = 64
    _reject(codes, _replace(grid, sc=sc), spec, r"blk.0.w.sc: expected integers in \[0, 63\]")
    m = grid.m.copy()
    m[1, 1] = -1
    _reject(codes, _replace(grid, m=m), spec, r"blk.0.w.m: expected integers in \[0, 63\]")
    d = grid.d.copy()
    d[0, 0] = np.float32(1e-3) + np.float32(1e-9)
    _reject(codes, _replace(grid, d=d), spec, r"blk.0.w.d: expected values representable in fp16")
    _reject(codes, _replace(grid, dmin=None, m=None), spec, r"blk.0.w: spec q4_k-like expects dmin")
    _reject(codes, _replace(grid, d=grid.d[:, :0]), spec, r"blk.0.w.d: expected shape \[4, 1\]")
    _reject(codes, _replace(grid, sc=grid.sc.astype(np.int64)), spec,
            r"blk.0.w.sc: expected dtype int16 \(not int64\)")
    q6 = SUPER_SPECS["q6_k"]
    codes6, grid6 = _fitted(rng, q6)
    _reject(codes6, SuperBlockGrid(d=grid6.d, sc=grid6.sc, dmin=grid6.d, m=grid6.sc), q6,
            r"spec q6_k-like has no dmin/m")
    _reject(codes[:, :128], grid, spec, r"blk.0.w: q4_k-like needs in_features divisible by 256")
    _reject(codes, AffineGrid(scales=np.ones((4, 8), np.float32)), spec,
            r"expects a superblock grid \(not affine\)")


def test_codebook_rejections(rng):
    nl = CODEBOOK_SPECS["iq4_nl"]
    codes, grid = _fitted(rng, nl)
    _reject(codes, CodebookGrid(values=np.zeros((4, 8, 16), np.float32)), nl,
            r"blk.0.w.scales: missing")
    free = CODEBOOK_SPECS["free4g32"]
    codes2, grid2 = _fitted(rng, free)
    v = grid2.values.copy()
    v[0, 0, 0] = np.float32(0.1)
    _reject(codes2, _replace(grid2, values=v), free, r"blk.0.w.values: expected values")
    _reject(codes2, _replace(grid2, values=v[:, :, :8]), free,
            r"blk.0.w.values: expected shape \[4, 8, 16\]")


def test_grid_from_arrays_checks_names_and_dtypes():
    ok = {"scales": np.ones((2, 3), np.float32), "zeros": np.zeros((2, 3), np.uint8)}
    assert isinstance(grid_from_arrays(GridKind.AFFINE, ok), AffineGrid)
    with pytest.raises(GridError, match=r"t.zeros: expected dtype uint8 \(not int16\)"):
        grid_from_arrays(GridKind.AFFINE, {**ok, "zeros": ok["zeros"].astype(np.int16)}, "t")
    with pytest.raises(GridError, match=r"t: superblock grid expected arrays \['d', 'sc'\]"):
        grid_from_arrays(GridKind.SUPERBLOCK, ok, "t")
    with pytest.raises(GridError, match="affine grid expected arrays"):
        grid_from_arrays(GridKind.AFFINE, {**ok, "d": ok["scales"]})
