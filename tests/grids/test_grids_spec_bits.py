"""GridSpec (de)serialisation and checks, float rounding against torch, bit packing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qexport.grids import (GridError, GridKind, GridSpec, ZeroDomain, check_representable,
                           pack_bits, round_to_dtype, unpack_bits)

from qexport.testing.specs import CODEBOOK_SPECS, SUPER_SPECS, affine_spec

ALL_SPECS = ([affine_spec(b, z, g) for b in (2, 3, 8) for z in ("sym", "asym", "fmin")
              for g in (32, -1)] + list(SUPER_SPECS.values()) + list(CODEBOOK_SPECS.values())
             + [GridSpec.affine(4, 128, False, scale_dtype="bf16", ragged=False,
                                zero_range=(0, 7), out_multiple=8)])


# ---- GridSpec ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name + s.zero.value)
def test_spec_dict_roundtrip_through_json(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    back = GridSpec.from_dict(d)
    assert back == spec and hash(back) == hash(spec)
    assert isinstance(back.kind, GridKind) and isinstance(back.zero, ZeroDomain)


def test_spec_from_dict_rejections():
    d = SUPER_SPECS["q4_k"].to_dict()
    with pytest.raises(GridError, match=r"specs.x: unknown keys \['colour'\]"):
        GridSpec.from_dict({**d, "colour": 1}, "specs.x")
    with pytest.raises(GridError, match="specs.x: bad kind/zero"):
        GridSpec.from_dict({**d, "kind": "lattice"}, "specs.x")
    with pytest.raises(GridError, match="specs.x: bad kind/zero"):
        GridSpec.from_dict({**d, "zero": "negative"}, "specs.x")
    with pytest.raises(GridError, match="table expected 16 entries"):
        GridSpec.from_dict({**CODEBOOK_SPECS["iq4_nl"].to_dict(), "table": [1, 2, 3]})


@pytest.mark.parametrize("kw,match", [
    (dict(bits=0), "bits expected in 1..8"), (dict(bits=9), "bits expected in 1..8"),
    (dict(group_size=0), "group_size expected -1 or >= 1"),
    (dict(group_size=-2), "group_size expected"),
    (dict(scale_dtype="fp8"), "scale_dtype expected one of"),
])
def test_spec_post_init_rejections(kw, match):
    base = dict(name="s", kind=GridKind.AFFINE, bits=4, group_size=32)
    with pytest.raises(GridError, match=match):
        GridSpec(**{**base, **kw})


def test_spec_superblock_rejections():
    with pytest.raises(GridError, match="positive multiple of group_size"):
        GridSpec(name="s", kind=GridKind.SUPERBLOCK, bits=4, group_size=48, super_size=256,
                 sub_scale_range=(0, 63))
    with pytest.raises(GridError, match="needs sub_scale_range"):
        GridSpec(name="s", kind=GridKind.SUPERBLOCK, bits=4, group_size=32, super_size=256)


def test_spec_derived_quantities_and_check_shape():
    s = GridSpec.affine(4, 128, False)
    assert s.zero_range == (0, 15) and s.maxq == 15 and s.code_offset == 0
    assert GridSpec.affine(3, 32, True).code_offset == 4
    assert s.n_groups(576) == 5 and s.group_len(576) == 128 and s.param_span == 128
    assert GridSpec.affine(4, -1, True).n_groups(77) == 1
    assert SUPER_SPECS["q4_k"].param_span == 256 and SUPER_SPECS["q4_k"].n_groups(512) == 16
    s.check_shape((7, 576), "t")                          # ragged allowed
    with pytest.raises(GridError, match=r"t: affine-w4g128a needs in_features divisible by "
                                        r"group size 128 \(found 576\)"):
        GridSpec.affine(4, 128, False, ragged=False).check_shape((7, 576), "t")
    with pytest.raises(GridError, match=r"t: q4_k-like needs in_features divisible by 256"):
        SUPER_SPECS["q4_k"].check_shape((4, 576), "t")
    with pytest.raises(GridError, match=r"out_features divisible by 8 \(found 12\)"):
        GridSpec.affine(4, 32, True, out_multiple=8).check_shape((12, 64), "t")


# ---- float rounding ---------------------------------------------------------------------------
def _special_f32(rng) -> np.ndarray:
    """Random magnitudes over the whole fp32 range, exact bf16 ties (both parities), fp16
    ties, subnormals, signed zeros, infinities, max finite."""
    r = (rng.standard_normal(4000) * 10.0 ** rng.uniform(-40, 38, 4000)).astype(np.float32)
    hi = rng.integers(0, 2 ** 16, 500, dtype=np.uint64) << np.uint64(16)
    ties = (hi | np.uint64(0x8000)).astype(np.uint32).view(np.float32)      # exact bf16 ties
    f16t = (np.arange(1, 400, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -10)
    sp = np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, 65504.0,
                   65520.0, 65519.99, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26], np.float32)
    x = np.concatenate([r, ties, f16t, sp])
    return x[np.isfinite(x) | np.isinf(x)]


def test_bf16_rounding_matches_torch(rng):
    x = _special_f32(rng)
    ours = round_to_dtype(x, "bf16")
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    nan = round_to_dtype(np.array([np.nan], np.float32), "bf16")
    assert np.isnan(nan).all()


def test_fp16_rounding_matches_torch(rng):
    x = _special_f32(rng)
    with np.errstate(over="ignore"):                     # values beyond fp16 become inf
        ours = round_to_dtype(x, "fp16")
    ref = torch.from_numpy(x).half().float().numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert round_to_dtype(np.float32([1.1]), "fp32")[0] == np.float32(1.1)


def test_check_representable():
    check_representable(np.float32([0.5, -2.0, 65504.0, 2.0 ** -24]), "fp16", "x")
    with pytest.raises(GridError, match=r"s.d: expected values representable in fp16 "
                                        r"\(not 0.1.* at flat index 1\)"):
        check_representable(np.float32([0.5, 0.1]), "fp16", "s.d")
    with pytest.raises(GridError, match="s.d: expected finite values"):
        check_representable(np.float32([np.inf]), "fp32", "s.d")
    with pytest.raises(GridError, match="bf16"):
        check_representable(np.float32([1.0 + 2.0 ** -10]), "bf16", "x")


# ---- bit packing ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 31, 33, 257])
def test_pack_unpack_roundtrip(rng, bits, n):
    codes = rng.integers(0, 2 ** bits, (3, n), dtype=np.uint8)
    if n:
        codes[0, 0], codes[-1, -1] = 2 ** bits - 1, 0    # extremes
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, -(-n * bits // 8))
    assert np.array_equal(unpack_bits(packed, bits, n), codes)
    # independent bit-stream oracle: Python big integers, code i at bit i*bits
    for r in range(3):
        v = sum(int(c) << (i * bits) for i, c in enumerate(codes[r]))
        assert packed[r].tobytes() == v.to_bytes(packed.shape[1], "little")


def test_pack_golden():
    # 2-bit [1, 2, 3]: bits 0-1 = 01, 2-3 = 10, 4-5 = 11 -> 0b00111001 = 0x39
    assert pack_bits(np.uint8([1, 2, 3]), 2).tolist() == [0x39]
    # 4-bit [1, 15, 3]: low nibble first -> 0xF1, 0x03
    assert pack_bits(np.uint8([1, 15, 3]), 4).tolist() == [0xF1, 0x03]
    # 3-bit [5, 3, 7]: 5 | 3 << 3 | 7 << 6 = 477 = 0x01DD
    assert pack_bits(np.uint8([5, 3, 7]), 3).tolist() == [0xDD, 0x01]
    # 3-bit, GPTQ layout: 32 codes fill exactly three little-endian int32 words; word 0
    # holds codes 0..9 (i % 8 at bit 3i) plus the low two bits of code 10 (= 2) at bit 30:
    # 8 + 128 + 1536 + 16384 + 163840 + 1572864 + 14680064 + 134217728 + 2**31 = 0x88FAC688
    words = pack_bits(np.arange(32, dtype=np.uint8) % 8, 3).view("<u4")
    assert words.shape == (3,) and int(words[0]) == 0x88FAC688
    assert unpack_bits(np.uint8([0xDD, 0x01, 0xFF]), 3, 3).tolist() == [5, 3, 7]


def test_pack_rejections():
    with pytest.raises(GridError, match="bits expected in 1..8"):
        pack_bits(np.uint8([1]), 9)
    with pytest.raises(GridError, match="codes expected uint8"):
        pack_bits(np.int32([1]), 4)
    with pytest.raises(GridError, match="code 16 does not fit in 4 bits"):
        pack_bits(np.uint8([16]), 4)
    with pytest.raises(GridError, match="expected at least 2 bytes for 3 codes of 4 bits"):
        unpack_bits(np.uint8([1]), 4, 3)
