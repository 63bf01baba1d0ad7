"""Word packing (bitstream.py) against independent oracles: compressed-tensors' pack_to_int32,
a Python big-integer bit stream, AutoGPTQ's 3-bit word recipe and hand-computed golden words."""
from __future__ import annotations

import numpy as np
import pytest

from qexport.backends.vllm.bitstream import (n_words, pack_axis0, pack_words, unpack_axis0,
                                             unpack_words)
from qexport.backends.vllm.gptq import gptq_layer_tensors
from qexport.backends.vllm.specs import vllm_spec
from qexport.grids.grid import AffineGrid
from qexport.ir import QTensor

BITS = list(range(2, 9))


def _codes(bits: int, shape=(8, 96), seed=0) -> np.ndarray:
    return np.random.default_rng(seed + bits).integers(0, 2 ** bits, shape).astype(np.uint8)


def _bigint_words(row: np.ndarray, bits: int) -> list[int]:
    """Independent dense stream: code i at bit i*bits of one Python integer, cut into words."""
    acc = 0
    for i, v in enumerate(row.tolist()):
        acc |= int(v) << (i * bits)
    nw = -(-len(row) * bits // 32)
    return [(acc >> (32 * k)) & 0xFFFFFFFF for k in range(nw)]


@pytest.mark.parametrize("bits", BITS)
def test_word_layout_equals_compressed_tensors(bits):
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    u = _codes(bits, (40, 100))                                 # odd sizes: padding paths
    signed = torch.from_numpy(u.astype(np.int16) - 2 ** (bits - 1)).to(torch.int8)
    np.testing.assert_array_equal(pack_words(u, bits, "word"),
                                  helpers.pack_to_int32(signed, bits).numpy())
    np.testing.assert_array_equal(pack_axis0(u, bits, "word"),
                                  helpers.pack_to_int32(signed, bits, packed_dim=0).numpy())


@pytest.mark.parametrize("bits", BITS)
def test_dense_layout_equals_bigint_stream(bits):
    u = _codes(bits, (5, 77))
    got = pack_words(u, bits, "dense").view(np.uint32)
    assert got.shape == (5, n_words(77, bits, "dense")) == (5, -(-77 * bits // 32))
    for r in range(5):
        assert got[r].tolist() == _bigint_words(u[r], bits)


@pytest.mark.parametrize("layout", ["dense", "word"])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip(bits, layout):
    u = _codes(bits, (33, 70))
    np.testing.assert_array_equal(unpack_words(pack_words(u, bits, layout), bits, 70, layout), u)
    np.testing.assert_array_equal(unpack_axis0(pack_axis0(u, bits, layout), bits, 33, layout), u)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_layouts_agree_when_bits_divide_32(bits):
    u = _codes(bits, (4, 64))
    np.testing.assert_array_equal(pack_words(u, bits, "dense"), pack_words(u, bits, "word"))


def test_unpack_refuses_wrong_word_count():
    from qexport.errors import VerifyError
    with pytest.raises(VerifyError, match="expected 24 words"):
        unpack_words(np.zeros((2, 26), np.int32), 3, 256, "dense")


def _gptq_qt(bits: int, codes: np.ndarray, group: int = -1) -> QTensor:
    out_f, in_f = codes.shape
    spec = vllm_spec(bits, group, True, fmt="gptq")
    G = spec.n_groups(in_f)
    return QTensor("m.weight", codes, AffineGrid(scales=np.ones((out_f, G), np.float32)), spec)


def test_gptq_golden_words_4bit():
    torch = pytest.importorskip("torch")
    codes = np.zeros((8, 8), np.uint8)                          # [out, in]
    codes[0] = np.arange(8)                                      # input rows 0..7 of column 0
    codes[1] = np.arange(1, 9)
    codes[2] = 15
    t = gptq_layer_tensors(_gptq_qt(4, codes), "m", torch.float16)
    qw = t["m.qweight"].numpy().view(np.uint32)
    assert qw.shape == (1, 8)
    assert [hex(v) for v in qw[0, :3]] == ["0x76543210", "0x87654321", "0xffffffff"]
    assert t["m.qzeros"].numpy().view(np.uint32).tolist() == [[0x77777777]]   # z - 1 = 7
    assert t["m.g_idx"].tolist() == [0] * 8


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (8, 0x7F7F7F7F)])
def test_gptq_golden_sym_qzeros(bits, word):
    torch = pytest.importorskip("torch")
    n = 32
    t = gptq_layer_tensors(_gptq_qt(bits, np.zeros((n, n), np.uint8)), "m", torch.float16)
    assert set(t["m.qzeros"].numpy().view(np.uint32).ravel().tolist()) == {word}


def _autogptq_3bit_pack(col: np.ndarray) -> list[int]:
    """AutoGPTQ's 3-bit recipe for 32 values -> 3 words (values 0-9, split 10, 11-20, split 21,
    22-31), written from its description, not from the bit stream."""
    v = [int(x) for x in col]
    w0 = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] << 30) & 0xFFFFFFFF)
    w1 = (v[10] >> 2) | sum(v[11 + j] << (3 * j + 1) for j in range(10)) \
        | ((v[21] << 31) & 0xFFFFFFFF)
    w2 = (v[21] >> 1) | sum(v[22 + j] << (3 * j + 2) for j in range(10))
    return [w0, w1, w2]


def test_gptq_3bit_matches_autogptq_recipe_and_golden_zeros():
    torch = pytest.importorskip("torch")
    codes = _codes(3, (32, 64))                                  # [out, in]
    t = gptq_layer_tensors(_gptq_qt(3, codes, group=32), "m", torch.float16)
    qw = t["m.qweight"].numpy().view(np.uint32)                  # [in*3/32, out]
    assert qw.shape == (6, 32)
    for o in range(32):
        for blk in range(2):
            assert qw[3 * blk: 3 * blk + 3, o].tolist() == \
                _autogptq_3bit_pack(codes[o, 32 * blk: 32 * blk + 32])
    qz = t["m.qzeros"].numpy().view(np.uint32)                   # [G, out*3/32]
    assert [hex(v) for v in qz[0]] == ["0xdb6db6db", "0xb6db6db6", "0x6db6db6d"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_is_ct_weight_packed_transposed(bits):
    torch = pytest.importorskip("torch")
    from qexport.backends.vllm.ct import ct_layer_tensors
    codes = _codes(bits, (64, 128))
    qt = _gptq_qt(bits, codes)
    g = gptq_layer_tensors(qt, "m", torch.float16)["m.qweight"].numpy()
    c = ct_layer_tensors(qt, "m", torch.float16, "dense")["m.weight_packed"].numpy()
    np.testing.assert_array_equal(g, c.T)
