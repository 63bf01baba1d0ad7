"""compressed-tensors (the library vLLM 0.32 pins) as the oracle of qexport's CT packing.

For random IR tensors on every bit width 2..8, sym and asym, group and channel strategies:
1. ``PackedQuantizationCompressor.compress`` given the IR's dequantized weight, its scales and
   signed zero points writes exactly our ``weight_packed`` / ``weight_zero_point`` (in the
   library's own packing layout: ``word`` for CT <= 0.17, ``dense`` from 0.18);
2. its ``decompress`` of our tensors returns the IR's float32 value rounded once to the model
   dtype (fp16 / bf16), and exactly the IR's float32 value when the scales are given in fp32.
"""
from __future__ import annotations

import numpy as np
import pytest

from qexport.backends.vllm.ct import ct_layer_tensors, ct_weights_args
from qexport.backends.vllm.specs import vllm_spec

from vllm_irutil import random_qtensor

ct = pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")
from compressed_tensors.compressors import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402
from packaging.version import Version  # noqa: E402

LIB_LAYOUT = "dense" if Version(ct.__version__) >= Version("0.18.0") else "word"
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _scheme(bits, group, sym):
    return QuantizationScheme(targets=["Linear"], weights=ct_weights_args(bits, group, sym))


def _case(bits, group, sym, scale_dtype="fp16", shape=(64, 256), seed=0):
    spec = vllm_spec(bits, group, sym, fmt="ct", scale_dtype=scale_dtype)
    qt = random_qtensor(spec, *shape, seed=seed)
    ours = ct_layer_tensors(qt, "m", DT[scale_dtype], LIB_LAYOUT)
    return qt, {k.split(".", 1)[1]: v for k, v in ours.items()}


CASES = [(b, g, s) for b in range(2, 9) for s in (True, False) for g in (32, -1)]


@pytest.mark.parametrize("bits,group,sym", CASES)
def test_library_compress_writes_our_tensors(bits, group, sym):
    qt, ours = _case(bits, group, sym)
    state = {"weight": torch.from_numpy(qt.dequantize()),
             "weight_scale": torch.from_numpy(qt.grid.scales)}
    if not sym:
        state["weight_zero_point"] = torch.from_numpy(
            qt.grid.zeros.astype(np.int16) - 2 ** (bits - 1)).to(torch.int8)
    lib = PackedQuantizationCompressor.compress(state, _scheme(bits, group, sym))
    np.testing.assert_array_equal(lib["weight_packed"].numpy(), ours["weight_packed"].numpy())
    assert lib["weight_shape"].tolist() == ours["weight_shape"].tolist() == list(qt.shape)
    if sym:
        assert "weight_zero_point" not in lib and "weight_zero_point" not in ours
    else:
        np.testing.assert_array_equal(lib["weight_zero_point"].numpy(),
                                      ours["weight_zero_point"].numpy())


@pytest.mark.parametrize("bits,group,sym", CASES)
def test_library_decompress_is_ir_value(bits, group, sym):
    qt, ours = _case(bits, group, sym, seed=1)
    scheme = _scheme(bits, group, sym)
    ir = torch.from_numpy(qt.dequantize())
    got = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert got.dtype == torch.float16
    assert torch.equal(got, ir.to(torch.float16))
    ours["weight_scale"] = ours["weight_scale"].float()
    got32 = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert torch.equal(got32, ir)


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True), (8, False)])
def test_library_decompress_bf16(bits, sym):
    qt, ours = _case(bits, 64, sym, scale_dtype="bf16", seed=2)
    got = PackedQuantizationCompressor.decompress(dict(ours), _scheme(bits, 64, sym))["weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(qt.dequantize()).to(torch.bfloat16))


def test_fp16_rounding_is_real_so_the_dtype_matters():
    """The IR's fp32 values are not all fp16 values: the stated comparison (round once to the
    model dtype) is needed, and a decoder that rounded differently would be caught."""
    qt, _ = _case(8, 32, False, seed=3)
    w = qt.dequantize()
    assert not np.array_equal(w.astype(np.float16).astype(np.float32), w)
