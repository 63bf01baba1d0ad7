"""GGUF block packers and decoder: random IR -> pack -> gguf-py (independent oracle) and our
decoder; hand-built golden blocks; zero / constant / extreme blocks; rejections."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES

from qexport.backends.gguf import (GGUF_TYPES, dequantize_raw, gguf_type, pack_tensor,
                                   spec_for, type_for_spec, unpack_tensor)
from qexport.errors import LoweringError, UnsupportedError, VerifyError
from qexport.grids import (AffineGrid, CodebookGrid, GridKind, GridSpec, SuperBlockGrid,
                           ZeroDomain, dequantize)

TYPES = list(GGUF_TYPES)
FP16_MAX, FP16_TINY = 65504.0, 2.0 ** -24


def _f16(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def random_ir(name: str, out_f: int, in_f: int, rng: np.random.Generator,
              scale_exp: tuple[float, float] = (-4, 2)):
    """Random codes in range and random fp16 parameters (either sign, some zeros)."""
    spec = spec_for(name)
    codes = rng.integers(0, 2 ** spec.bits, (out_f, in_f)).astype(np.uint8)
    ng = in_f // spec.group_size

    def floats(shape):
        v = rng.standard_normal(shape) * 10.0 ** rng.uniform(*scale_exp, shape)
        v[rng.random(shape) < 0.05] = 0.0
        return _f16(v)

    if spec.kind == GridKind.AFFINE:
        mins = floats((out_f, ng)) if spec.zero == ZeroDomain.FLOAT else None
        return codes, AffineGrid(scales=floats((out_f, ng)), mins=mins), spec
    if spec.kind == GridKind.CODEBOOK:
        return codes, CodebookGrid(scales=floats((out_f, ng))), spec
    ns = in_f // 256
    lo, hi = spec.sub_scale_range
    sc = rng.integers(lo, hi + 1, (out_f, ng)).astype(np.int16)
    if spec.sub_min_range is None:
        return codes, SuperBlockGrid(d=floats((out_f, ns)), sc=sc), spec
    m = rng.integers(spec.sub_min_range[0], spec.sub_min_range[1] + 1, (out_f, ng))
    return codes, SuperBlockGrid(d=floats((out_f, ns)), sc=sc, dmin=floats((out_f, ns)),
                                 m=m.astype(np.int16)), spec


def _same_grid(a, b) -> bool:
    ka, kb = a.arrays(), b.arrays()
    return ka.keys() == kb.keys() and all(
        ka[k].dtype == kb[k].dtype and np.array_equal(ka[k].view(np.uint8), kb[k].view(np.uint8))
        for k in ka)


def _check_roundtrip(codes, grid, spec, name: str) -> np.ndarray:
    row = gguf_type(name)
    raw = pack_tensor(codes, grid, spec, name="blk.0.w")
    assert raw.dtype == np.uint8 and raw.shape == (codes.shape[0], row.row_bytes(codes.shape[1]))
    oracle = gguf.quants.dequantize(raw, row.ggml_type)
    ours = dequantize(codes, grid, spec)
    assert oracle.dtype == np.float32 and oracle.shape == codes.shape
    assert np.array_equal(oracle.view(np.uint32), ours.view(np.uint32))   # bit for bit, -0 too
    c2, g2 = unpack_tensor(raw, name, codes.shape)
    assert np.array_equal(c2, codes) and _same_grid(grid, g2)
    assert np.array_equal(dequantize_raw(raw, name, codes.shape).view(np.uint32),
                          oracle.view(np.uint32))
    return raw


# ---------------------------------------------------------------- the type table
def test_type_table_matches_gguf_py():
    assert TYPES == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                     "Q6_K", "IQ4_NL", "IQ4_XS"]
    for name, row in GGUF_TYPES.items():
        assert row.ggml_type == gguf.GGMLQuantizationType[name]
        assert (row.block_size, row.type_size) == GGML_QUANT_SIZES[row.ggml_type]
        assert row.spec.name == f"gguf-{name.lower()}" and not row.spec.ragged
        assert row.spec.row_multiple == row.block_size
        assert gguf_type(name.lower()) is row and type_for_spec(row.spec) is row
    assert gguf_type(gguf.GGMLQuantizationType.Q6_K).name == "Q6_K"
    assert GGUF_TYPES["Q4_K"].bits_per_weight == 4.5
    assert GGUF_TYPES["Q6_K"].row_bytes(512) == 420


def test_unknown_type_and_foreign_spec_are_refused():
    with pytest.raises(UnsupportedError, match="Q4_K_M.*expected one of Q4_0, Q4_1"):
        gguf_type("Q4_K_M")
    with pytest.raises(UnsupportedError, match="no GGUF type"):
        type_for_spec(GridSpec.affine(4, 32, sym=True))
    tweaked = GridSpec.from_dict({**spec_for("Q4_K").to_dict(), "row_multiple": 32})
    with pytest.raises(UnsupportedError, match="differs"):
        type_for_spec(tweaked)


# ---------------------------------------------------------------- random IR vs gguf-py
@pytest.mark.parametrize("name", TYPES)
def test_random_ir_roundtrips_through_gguf_py(name):
    rng = np.random.default_rng(TYPES.index(name))
    for out_f, in_f in ((3, 256), (7, 768)):
        _check_roundtrip(*random_ir(name, out_f, in_f, rng), name)


@pytest.mark.parametrize("name", TYPES)
def test_extreme_zero_and_constant_blocks(name):
    """fp16 max / min subnormal / negative zero scales, all-zero and constant blocks."""
    rng = np.random.default_rng(100 + TYPES.index(name))
    codes, grid, spec = random_ir(name, 6, 512, rng)
    extremes = np.array([FP16_MAX, -FP16_MAX, FP16_TINY, -FP16_TINY, -0.0, 0.0], np.float32)
    for arr in grid.arrays().values():
        if arr.dtype == np.float32:
            arr[:, 0] = extremes[: arr.shape[0]]            # first block of every row
            arr[:, -1] = extremes[::-1][: arr.shape[0]]
    codes[0, :] = 0                                         # row 0: all codes 0
    codes[1, :] = spec.maxq                                 # row 1: constant max code
    codes[2, : spec.group_size] = spec.maxq // 2            # a constant group
    if isinstance(grid, SuperBlockGrid):
        lo, hi = spec.sub_scale_range
        grid.sc[0], grid.sc[1] = lo, hi
        if grid.m is not None:
            grid.m[0], grid.m[1] = spec.sub_min_range
    _check_roundtrip(codes, grid, spec, name)
    zero_codes = np.zeros_like(codes)
    zero = {k: np.zeros_like(v) for k, v in grid.arrays().items()}
    raw = _check_roundtrip(zero_codes, type(grid)(**zero), spec, name)
    assert not np.any(gguf.quants.dequantize(raw, gguf_type(name).ggml_type))


# ---------------------------------------------------------------- golden blocks
def _one_block(name, codes, **params):
    """Pack a single block (1 row) with the given codes and per-block parameters."""
    spec = spec_for(name)
    c = np.asarray(codes, dtype=np.uint8)[None, :]
    p = {k: (np.asarray(v, np.float32)[None] if k in ("d", "dmin", "scales", "mins")
             else np.asarray(v, np.int16)[None]) for k, v in params.items()}
    if spec.kind == GridKind.AFFINE:
        grid = AffineGrid(scales=p["scales"].reshape(1, -1), mins=p.get("mins"))
    elif spec.kind == GridKind.CODEBOOK:
        grid = CodebookGrid(scales=p["scales"].reshape(1, -1))
    else:
        grid = SuperBlockGrid(d=p["d"].reshape(1, 1), sc=p["sc"].reshape(1, -1),
                              dmin=None if "dmin" not in p else p["dmin"].reshape(1, 1),
                              m=None if "m" not in p else p["m"].reshape(1, -1))
    raw = _check_roundtrip(c, grid, spec, name)
    return raw[0], gguf.quants.dequantize(raw, gguf_type(name).ggml_type)[0]


def test_golden_q4_0():
    # block_q4_0 = { fp16 d; uint8 qs[16] }: qs[j] = q[j] | q[j+16] << 4
    codes = [j % 16 for j in range(16)] + [15 - j for j in range(16)]
    raw, x = _one_block("Q4_0", codes, scales=[0.5])
    assert raw[:2].tolist() == [0x00, 0x38]                          # fp16(0.5) = 0x3800
    assert raw[2:].tolist() == [j | ((15 - j) << 4) for j in range(16)]
    assert raw[2] == 0xF0 and raw[17] == 0x0F
    assert x[0] == 0.5 * (0 - 8) and x[16] == 0.5 * (15 - 8) and x[31] == 0.5 * (0 - 8)


def test_golden_q4_k():
    # block_q4_K = { fp16 d; fp16 dmin; uint8 scales[12]; uint8 qs[128] }
    sc = [1, 2, 3, 4, 17, 33, 49, 63]
    m = [0, 5, 10, 15, 48, 0, 16, 33]
    codes = [(i + 3 * (i // 32)) % 16 for i in range(256)]
    raw, x = _one_block("Q4_K", codes, d=[1.0], dmin=[2.0], sc=sc, m=m)
    assert raw[:4].tolist() == [0x00, 0x3C, 0x00, 0x40]             # d = 1.0, dmin = 2.0
    # scales[0..3] = sc[j] | (sc[j+4] >> 4) << 6; scales[4..7] = m[j] | (m[j+4] >> 4) << 6;
    # scales[8..11] = (sc[j+4] & 15) | (m[j+4] & 15) << 4
    assert raw[4:16].tolist() == [0x41, 0x82, 0xC3, 0xC4, 0xC0, 0x05, 0x4A, 0x8F,
                                  0x01, 0x01, 0x01, 0x1F]
    # qs[32c + l]: low nibble = element 64c + l, high nibble = element 64c + 32 + l
    qs = raw[16:]
    for c in range(4):
        for l in range(32):
            assert qs[32 * c + l] == codes[64 * c + l] | (codes[64 * c + 32 + l] << 4)
    # element 40: sub-block 1 (sc 2, m 5), code (40 + 3) % 16 = 11 -> 2*11 - 2*5
    assert x[40] == 2 * 11 - 2 * 5 and x[255] == 63 * codes[255] - 2 * 33


def test_golden_q6_k():
    # block_q6_K = { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d }
    codes = [(7 * i + 5 * (i // 32)) % 64 for i in range(256)]
    sc = [16 * j - 128 for j in range(16)]
    raw, x = _one_block("Q6_K", codes, d=[0.25], sc=sc)
    assert raw[208:].tolist() == [0x00, 0x34]                        # fp16(0.25) = 0x3400
    assert raw[192:208].tolist() == [(16 * j - 128) & 0xFF for j in range(16)]
    for h in range(2):
        e = codes[128 * h: 128 * h + 128]
        for l in range(32):
            assert raw[64 * h + l] == (e[l] & 15) | ((e[l + 64] & 15) << 4)
            assert raw[64 * h + 32 + l] == (e[l + 32] & 15) | ((e[l + 96] & 15) << 4)
            assert raw[128 + 32 * h + l] == ((e[l] >> 4) | ((e[l + 32] >> 4) << 2)
                                             | ((e[l + 64] >> 4) << 4) | ((e[l + 96] >> 4) << 6))
    assert raw[0] == 0xA0                        # elements 0 (code 0) and 64 (code 10)
    assert x[17] == 0.25 * (16 - 128) * ((7 * 17) % 64 - 32)


def test_golden_q3_k():
    # block_q3_K = { uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; fp16 d }
    codes = [(5 * i + i // 32) % 8 for i in range(256)]
    sc = [-32, 31, 0, -1, 5, -5, 16, -16, 1, 2, 3, 4, -30, 30, 7, -7]
    raw, x = _one_block("Q3_K", codes, d=[-1.5], sc=sc)
    assert raw[108:].tolist() == [0x00, 0xBE]                        # fp16(-1.5) = 0xBE00
    s = [v + 32 for v in sc]                                         # stored 6-bit, +32
    exp_scales = [(s[j] & 15) | ((s[j + 8] & 15) << 4) for j in range(8)]
    exp_scales += [sum(((s[4 * g + i] >> 4) & 3) << (2 * g) for g in range(4)) for i in range(4)]
    assert raw[96:108].tolist() == exp_scales
    assert raw[96] == 0x00 | (0x21 & 15) << 4                          # s0 = 0, s8 = 33
    for l in range(32):                                              # hmask: bit i//32 of [i%32]
        assert raw[l] == sum(((codes[32 * k + l] >> 2) & 1) << k for k in range(8))
    for h in range(2):                                               # low 2 bits, Q2_K order
        for l in range(32):
            assert raw[32 + 32 * h + l] == sum((codes[128 * h + 32 * k + l] & 3) << (2 * k)
                                               for k in range(4))
    assert x[20] == np.float32(-1.5 * 31) * (codes[20] - 4)           # sub-block 1: sc 31


def test_golden_iq4_xs():
    # block_iq4_xs = { fp16 d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128] }
    codes = [(3 * i + i // 16) % 16 for i in range(256)]
    sc = [-32, -1, 0, 31, 10, -10, 20, -20]
    raw, x = _one_block("IQ4_XS", codes, d=[2.0], sc=sc)
    ls = [v + 32 for v in sc]                                         # 0, 31, 32, 63, 42, 22, 52, 12
    assert raw[:2].tolist() == [0x00, 0x40]
    scales_h = sum((ls[ib] >> 4) << (2 * ib) for ib in range(8))
    assert raw[2:4].tolist() == [scales_h & 0xFF, scales_h >> 8]
    assert raw[4:8].tolist() == [(ls[0] & 15) | (ls[1] & 15) << 4, (ls[2] & 15) | (ls[3] & 15) << 4,
                                 (ls[4] & 15) | (ls[5] & 15) << 4, (ls[6] & 15) | (ls[7] & 15) << 4]
    for ib in range(8):
        for j in range(16):
            assert raw[8 + 16 * ib + j] == codes[32 * ib + j] | (codes[32 * ib + 16 + j] << 4)
    kv = gguf.quants.IQ4_NL.kvalues
    assert x[100] == np.float32(2.0 * sc[3]) * kv[codes[100]]


def test_golden_q2_k_and_q5_k_and_q5_0():
    codes = [(i * 3 + i // 32) % 4 for i in range(256)]
    raw, _ = _one_block("Q2_K", codes, d=[1.0], dmin=[0.5], sc=list(range(16)),
                        m=list(range(15, -1, -1)))
    assert raw[:16].tolist() == [j | ((15 - j) << 4) for j in range(16)]
    assert raw[80:].tolist() == [0x00, 0x3C, 0x00, 0x38]
    codes5 = [(11 * i + i // 32) % 32 for i in range(256)]
    raw, _ = _one_block("Q5_K", codes5, d=[1.0], dmin=[1.0], sc=[1] * 8, m=[2] * 8)
    for c in range(4):                                               # qh[l] bits 2c, 2c+1
        for l in range(32):
            hb = ((raw[16 + l] >> (2 * c)) & 1, (raw[16 + l] >> (2 * c + 1)) & 1)
            assert hb == (codes5[64 * c + l] >> 4, codes5[64 * c + 32 + l] >> 4)
    codes50 = [(9 * j) % 32 for j in range(32)]
    raw, _ = _one_block("Q5_0", codes50, scales=[1.0])
    qh = int.from_bytes(bytes(raw[2:6]), "little")
    assert qh == sum((c >> 4) << j for j, c in enumerate(codes50))


# ---------------------------------------------------------------- rejections
def test_wrong_row_length_names_tensor_and_sizes():
    rng = np.random.default_rng(0)
    codes, grid, spec = random_ir("Q4_0", 2, 576, rng)
    pack_tensor(codes, grid, spec_for("Q4_0"))                        # 576 = 18 x 32 is fine
    sb = SuperBlockGrid(d=np.ones((2, 2), np.float32), sc=np.ones((2, 18), np.int16),
                        dmin=np.ones((2, 2), np.float32), m=np.ones((2, 18), np.int16))
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.mlp\.up_proj.*256.*576"):
        pack_tensor(codes, sb, spec_for("Q4_K"), name="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(LoweringError, match=r"blk\.1.*32.*40"):
        pack_tensor(codes[:, :40], AffineGrid(scales=np.ones((2, 2), np.float32)),
                    spec_for("Q8_0"), name="blk.1")


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K", "IQ4_NL"])
def test_out_of_range_values_are_refused(name):
    rng = np.random.default_rng(1)
    codes, grid, spec = random_ir(name, 2, 256, rng)
    bad = codes.copy()
    bad[1, 7] = 2 ** spec.bits
    with pytest.raises(LoweringError, match=r"w9\.codes.*expected integers in \[0, "):
        pack_tensor(bad, grid, spec, name="w9")
    arr = grid.arrays()
    key = "sc" if "sc" in arr else "scales"
    if key == "sc":
        arr["sc"][0, 0] = spec.sub_scale_range[1] + 1
        with pytest.raises(LoweringError, match=r"w9\.sc.*expected integers"):
            pack_tensor(codes, grid, spec, name="w9")
    else:
        arr["scales"][0, 0] = 0.1                                     # not an fp16 value
        with pytest.raises(LoweringError, match=r"w9\.scales.*representable in fp16"):
            pack_tensor(codes, grid, spec, name="w9")


def test_wrong_grid_kind_and_foreign_spec_are_refused():
    rng = np.random.default_rng(2)
    codes, grid, spec = random_ir("Q4_0", 2, 256, rng)
    with pytest.raises(LoweringError, match="superblock grid"):
        pack_tensor(codes, grid, spec_for("Q4_K"), name="t")
    with pytest.raises(LoweringError, match="t: .*no GGUF type"):
        pack_tensor(codes, grid, GridSpec.affine(4, 32, sym=True), name="t")


def test_decoder_refuses_wrong_sizes():
    with pytest.raises(VerifyError, match="expected 288 bytes"):
        unpack_tensor(np.zeros((2, 100), np.uint8), "Q4_K", (2, 256))
    with pytest.raises(VerifyError, match="multiple of 256"):
        unpack_tensor(np.zeros((2, 144), np.uint8), "Q4_K", (2, 250))
