"""One-node MatMulNBits graphs: run onnxruntime's own kernel on packed weights, and probe which
(bits, block_size, sym) the installed onnxruntime computes exactly.

Feeding ``A = I_K`` returns the weight itself (``Y = I @ W^T``): each output is one product
``w * 1`` plus zeros, so an exact kernel gives the dequantized weights back bit for bit.
"""
from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper

from .builder import MS_DOMAIN, OPSET, np_to_onnx_dtype
from .pack import MnbWeights, pack_arrays
from .session import make_session
from .specs import MNB_BITS, MNB_BLOCK_SIZES, MnbFormat

__all__ = ["one_node_model", "run_one_node", "decode_with_ort", "supported_formats"]


def one_node_model(w: MnbWeights, accuracy_level: int = 0) -> bytes:
    """Serialized model ``Y[M, N] = MatMulNBits(A[M, K], B, scales[, zero_points])``."""
    elem = np_to_onnx_dtype(w.scales.dtype)
    inits = [helper.make_tensor("B", TensorProto.UINT8, w.B.shape, w.B.tobytes(), raw=True),
             helper.make_tensor("scales", elem, w.scales.shape, w.scales.tobytes(), raw=True)]
    ins = ["A", "B", "scales"]
    if w.zero_points is not None:
        inits.append(helper.make_tensor("zp", TensorProto.UINT8, w.zero_points.shape,
                                        w.zero_points.tobytes(), raw=True))
        ins.append("zp")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain=MS_DOMAIN,
                            **w.attrs(accuracy_level))
    g = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", elem, ["M", w.K])],
                          [helper.make_tensor_value_info("Y", elem, ["M", w.N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                            helper.make_opsetid(MS_DOMAIN, 1)])
    m.ir_version = 9
    return m.SerializeToString()


def run_one_node(w: MnbWeights, A: np.ndarray, accuracy_level: int = 0,
                 device: str = "cpu") -> tuple[np.ndarray, str]:
    """onnxruntime's MatMulNBits on ``A [M, K]``; returns (Y [M, N], provider that ran)."""
    sess, prov = make_session(one_node_model(w, accuracy_level), device, threads=1)
    return sess.run(["Y"], {"A": A.astype(w.scales.dtype)})[0], prov


def decode_with_ort(w: MnbWeights, accuracy_level: int = 0,
                    device: str = "cpu") -> tuple[np.ndarray, str]:
    """Dequantized weight ``[N, K]`` as onnxruntime computes it (identity input)."""
    Y, prov = run_one_node(w, np.eye(w.K, dtype=np.float32), accuracy_level, device)
    return np.ascontiguousarray(Y.T), prov


def _random_weights(fmt: MnbFormat, rng: np.random.Generator, K: int, N: int) -> tuple:
    kb = -(-K // fmt.block_size)
    codes = rng.integers(0, 2 ** fmt.bits, size=(N, K), dtype=np.uint8)
    scales = rng.uniform(-2, 2, size=(N, kb)).astype(np.float16).astype(np.float32)
    zeros = None if fmt.sym else rng.integers(0, 2 ** fmt.bits, size=(N, kb), dtype=np.uint8)
    return codes, scales, zeros


@functools.cache
def supported_formats(device: str = "cpu") -> frozenset[MnbFormat]:
    """Every (bits, block_size, sym) the installed onnxruntime runs and decodes exactly
    (fp32, accuracy_level 0, a ragged K), probed once per process."""
    from .decode import decode_mnb
    rng = np.random.default_rng(0)
    ok = set()
    for bits in MNB_BITS:
        for bs in MNB_BLOCK_SIZES:
            for sym in (True, False):
                fmt = MnbFormat(bits, bs, sym)
                codes, scales, zeros = _random_weights(fmt, rng, K=bs + bs // 2, N=8)
                w = pack_arrays(codes, scales, zeros, fmt, "fp32")
                try:
                    got, _ = decode_with_ort(w, 0, device)
                except Exception:  # noqa: BLE001 - a kernel that refuses is "unsupported"
                    continue
                want = decode_mnb(w.B, w.scales, w.zero_points, w.K, w.N, bits, bs)
                if np.array_equal(got, want):
                    ok.add(fmt)
    return frozenset(ok)
