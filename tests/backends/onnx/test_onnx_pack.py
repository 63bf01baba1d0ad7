"""MatMulNBits packing: golden bytes, our decoder vs the IR, onnxruntime's own kernel vs both."""
from __future__ import annotations

import numpy as np
import pytest

from qexport.backends.onnx import (MNB_BITS, MNB_BLOCK_SIZES, MnbFormat, decode_mnb,
                                   decode_mnb_codes, mnb_format_of, mnb_spec, pack_arrays,
                                   pack_qtensor, supported_formats)
from qexport.backends.onnx.probe import decode_with_ort, run_one_node
from qexport.errors import LoweringError, UnsupportedError
from qexport.grids import (AffineGrid, CodebookGrid, GridKind, GridSpec, SuperBlockGrid,
                           ZeroDomain, dequantize, fit_minmax, quantize_nearest)
from qexport.ir import QTensor

COMBOS = [(b, bs, sym) for b in MNB_BITS for bs in MNB_BLOCK_SIZES for sym in (True, False)]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _random_qtensor(rng, bits, bs, sym, N=12, K=None) -> QTensor:
    K = K or bs * 2 + bs // 2 + 3                  # ragged last block
    spec = mnb_spec(bits, bs, sym)
    W = rng.normal(0, 0.05, (N, K)).astype(np.float32)
    W[0, :bs] = 0.0                                 # a zero group
    W[1, :bs] = 0.03                                # a constant group
    grid = fit_minmax(spec, W)
    return QTensor("w", quantize_nearest(spec, grid, W), grid, spec)


# ---- golden bytes (written by hand from the operator's contract) ----------------------------
def test_golden_4bit_low_nibble_first_and_zero_points():
    fmt = MnbFormat(4, 16, False)
    codes = np.concatenate([np.tile(np.arange(16, dtype=np.uint8), (2, 1)),
                            np.array([[5, 6], [7, 9]], np.uint8)], axis=1)         # K = 18
    zeros = np.array([[3, 12], [0, 15]], np.uint8)
    w = pack_arrays(codes, np.ones((2, 2), np.float32), zeros, fmt)
    assert w.B.shape == (2, 2, 8)
    assert list(w.B[0, 0]) == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    # row 0, block 1: codes 5, 6 then 14 pad codes = the block's zero point 12
    assert list(w.B[0, 1]) == [0x65] + [0xCC] * 7
    assert list(w.B[1, 1]) == [0x97] + [0xFF] * 7
    assert w.zero_points.tolist() == [[0xC3], [0xF0]]


def test_golden_2bit_and_8bit_and_symmetric_padding():
    codes = np.array([[0, 1, 2, 3, 3, 2, 1, 0] * 2 + [1]], np.uint8)             # K = 17
    w2 = pack_arrays(codes, np.ones((1, 2), np.float32), None, MnbFormat(2, 16, True))
    assert w2.B.shape == (1, 2, 4) and w2.zero_points is None
    assert list(w2.B[0, 0]) == [0b11100100, 0b00011011, 0b11100100, 0b00011011]
    assert list(w2.B[0, 1]) == [0b10101001, 0b10101010, 0b10101010, 0b10101010]  # pad code 2
    zeros = np.array([[1, 2, 3, 0, 1]], np.uint8)                                # 5 blocks
    w2a = pack_arrays(np.zeros((1, 80), np.uint8), np.ones((1, 5), np.float32), zeros,
                      MnbFormat(2, 16, False))
    assert list(w2a.zero_points[0]) == [0b00111001, 0b00000001]
    w8 = pack_arrays(codes, np.ones((1, 2), np.float32), None, MnbFormat(8, 16, True))
    assert list(w8.B[0, 1]) == [1] + [128] * 15


# ---- round trips and onnxruntime's kernel ---------------------------------------------------
@pytest.mark.parametrize("bits,bs,sym", COMBOS)
def test_pack_decode_matches_ir_and_onnxruntime(bits, bs, sym, rng):
    qt = _random_qtensor(rng, bits, bs, sym)
    want = dequantize(qt.codes, qt.grid, qt.spec)
    w = pack_qtensor(qt, "fp32")
    assert np.array_equal(decode_mnb_codes(w.B, w.K, w.N, bits, bs), qt.codes)
    ours = decode_mnb(w.B, w.scales, w.zero_points, w.K, w.N, bits, bs)
    assert np.array_equal(_bits(ours), _bits(want))
    if MnbFormat(bits, bs, sym) not in supported_formats():
        pytest.skip(f"installed onnxruntime does not run {qt.spec.name} exactly on CPU")
    for acc in (0, 1):
        got, prov = decode_with_ort(w, acc)        # x = I_K gives the weight rows back
        assert prov == "CPUExecutionProvider"
        assert np.array_equal(_bits(got), _bits(want)), f"accuracy_level {acc}"
    x = rng.normal(size=(3, w.K)).astype(np.float32)
    y, _ = run_one_node(w, x, 0)
    ref = x.astype(np.float64) @ want.astype(np.float64).T
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_probe_covers_4bit_everywhere():
    fmts = supported_formats()
    assert all(MnbFormat(4, bs, s) in fmts for bs in MNB_BLOCK_SIZES for s in (True, False))


def test_ort_disagrees_with_swapped_nibbles(rng):
    """The bitwise comparison can fail: a packer with the wrong nibble order is caught."""
    qt = _random_qtensor(rng, 4, 32, False)
    w = pack_qtensor(qt)
    w.B = ((w.B >> 4) | (w.B << 4)).astype(np.uint8)
    got, _ = decode_with_ort(w)
    assert not np.array_equal(got, dequantize(qt.codes, qt.grid, qt.spec))


def test_fp16_scales_pack_exactly(rng):
    qt = _random_qtensor(rng, 4, 64, True)
    w = pack_qtensor(qt, "fp16")
    assert w.scales.dtype == np.float16
    ours = decode_mnb(w.B, w.scales, w.zero_points, w.K, w.N, 4, 64)
    assert np.array_equal(_bits(ours), _bits(qt.dequantize()))


# ---- specs and refusals ---------------------------------------------------------------------
def test_mnb_spec_names_and_fields():
    s = mnb_spec(4, 32, True)
    assert s.name == "mnb-int4-b32-sym" and s.code_offset == 8 and s.zero == ZeroDomain.NONE
    a = mnb_spec(8, 128, False)
    assert a.name == "mnb-int8-b128-asym" and a.zero == ZeroDomain.INT and a.zero_range == (0, 255)
    assert s.ragged and a.scale_dtype == "fp16"


@pytest.mark.parametrize("bits,bs", [(3, 32), (5, 32), (4, 8), (4, 24), (4, 512), (1, 32)])
def test_unsupported_combinations_refused_by_name(bits, bs):
    with pytest.raises(UnsupportedError, match=r"bits=%d, block_size=%d.*bits in \[2, 4, 8\]"
                       % (bits, bs)):
        mnb_spec(bits, bs, True)


def test_gptq_style_affine_spec_accepted_but_not_float_min_codebook_superblock():
    assert mnb_format_of(GridSpec.affine(4, 128, False), "t") == MnbFormat(4, 128, False)
    with pytest.raises(UnsupportedError, match=r"t \(spec .*\): .*block_size=-1"):
        mnb_format_of(GridSpec.affine(4, -1, True), "t")
    with pytest.raises(UnsupportedError, match="float-min"):
        mnb_format_of(GridSpec.affine(4, 32, False, zero=ZeroDomain.FLOAT), "t")
    cb = GridSpec(name="cb4", kind=GridKind.CODEBOOK, bits=4, group_size=32, free_codebook=True)
    with pytest.raises(UnsupportedError, match="t: spec cb4 is a codebook grid"):
        mnb_format_of(cb, "t")
    q4k = GridSpec(name="q4k", kind=GridKind.SUPERBLOCK, bits=4, group_size=32, super_size=256,
                   sub_scale_range=(0, 63), sub_min_range=(0, 63))
    with pytest.raises(UnsupportedError, match="superblock"):
        mnb_format_of(q4k, "t")
    assert CodebookGrid and SuperBlockGrid   # the grid kinds those specs describe


def test_fp32_scales_not_representable_in_fp16_graph(rng):
    spec = mnb_spec(4, 32, False, scale_dtype="fp32")
    W = rng.normal(0, 0.05, (4, 64)).astype(np.float32)
    grid = fit_minmax(spec, W)
    grid = AffineGrid(scales=grid.scales + np.float32(1e-7), zeros=grid.zeros)
    qt = QTensor("model.x.weight", quantize_nearest(spec, grid, W), grid, spec)
    pack_qtensor(qt, "fp32")
    with pytest.raises(LoweringError, match=r"model\.x\.weight\.scales.*fp16"):
        pack_qtensor(qt, "fp16")
