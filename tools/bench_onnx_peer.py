"""The onnxruntime side of tools/bench_onnx.py: its own weight quantizer on qexport's FP graph.

``ort_quantize(algo, block, sym, fp_proto, reader)`` returns the quantized ModelProto:

| algo      | onnxruntime entry point                                                          |
|-----------|----------------------------------------------------------------------------------|
| default   | ``MatMulNBitsQuantizer`` + ``DefaultWeightOnlyQuantConfig`` (MLAS RTN; what       |
|           | onnxruntime-genai's builder uses)                                                |
| rtn       | ``MatMulNBitsQuantizer`` + ``RTNWeightOnlyQuantConfig`` (vendored INC RTN)        |
| hqq       | ``MatMulNBitsQuantizer`` + ``HQQWeightOnlyQuantConfig`` (asymmetric only, float   |
|           | zero points)                                                                     |
| gptq      | ``ort_gptq``: onnxruntime's GPTQ functions with a one-pass Hessian collection     |
| gptq-ort  | ``MatMulNBitsQuantizer`` + ``GPTQWeightOnlyQuantConfig``, unmodified (slow; used  |
|           | by ``check_ort_gptq``)                                                           |

Why ``ort_gptq``: the quantizer's GPTQ driver (``neural_compressor.weight_only.gptq_quantize``)
runs one full forward per calibration sample for each distinct MatMul input (120 in the sample
model: about 3 minutes per sample here), so 128 samples of 512 tokens would take hours. Its
Hessians come from the *float* model's activations (one session, created before any weight is
replaced), so one forward per sample can feed all of them. ``ort_gptq`` does that with the
driver's own accumulation formula, then calls onnxruntime's ``gptq``, ``pad_tensor``,
``quant_tensor`` and ``make_matmul_weight_only_node`` with the driver's defaults, exactly as the
driver does. ``check_ort_gptq`` compares the two on one calibration sample.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np

__all__ = ["CalibReader", "ort_quantize", "ort_gptq", "check_ort_gptq"]

THREADS = 2


class CalibReader:
    """onnxruntime CalibrationDataReader-style feeds: ``[1, L]`` ids, mask, empty past."""

    def __init__(self, samples: np.ndarray, n_layers: int, kv: int, hd: int):
        self.items = []
        for s in samples:
            d = {"input_ids": s[None].astype(np.int64), "attention_mask": np.ones((1, s.size),
                                                                                   np.int64)}
            for i in range(n_layers):
                for t in ("key", "value"):
                    d[f"past_key_values.{i}.{t}"] = np.zeros((1, kv, 0, hd), np.float32)
            self.items.append(d)
        self._it = iter(self.items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def ort_gptq(proto: Any, reader: CalibReader, block: int, sym: bool) -> Any:
    """onnxruntime's GPTQ (``gptq_quantize`` defaults: percdamp 0.01, blocksize 128, no act-order,
    no mse, per-channel) with every Hessian collected in one forward per sample."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor import weight_only as wo
    from onnxruntime.quantization.neural_compressor.onnx_model import ONNXModel
    model = ONNXModel(proto)
    nodes: dict[str, list[Any]] = {}
    for node in model.nodes():
        w = model.get_initializer(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None and len(w.dims) == 2:
            nodes.setdefault(node.input[0], []).append(node)
    names = list(nodes)
    org_output = list(model.model.graph.output)
    model.add_tensors_to_outputs(names)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    sess = ort.InferenceSession(model.model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    H: dict[str, np.ndarray] = {}
    nsamples = 0
    for data in reader:
        outs = sess.run(names, data)
        tmp = outs[0].shape[0]
        scale = nsamples / (nsamples + tmp)
        nsamples += tmp
        for name, inp in zip(names, outs):          # gptq_quantize's accumulation, per input
            inp = np.reshape(inp, (-1, inp.shape[-1]))
            inp = np.sqrt(2 / nsamples) * inp
            H[name] = (H[name] * scale if name in H else 0) + np.matmul(inp.T, inp)
    del sess
    model.remove_tensors_from_outputs(names)
    scheme = "sym" if sym else "asym"
    for name in names:
        for node in nodes[name]:
            weight = numpy_helper.to_array(model.get_initializer(node.input[1])).copy()
            q = wo.gptq(weight, H[name].copy(), num_bits=4, group_size=block, scheme=scheme,
                        blocksize=128, percdamp=0.01, actorder=False, mse=False, perchannel=True)
            k_blocks = (weight.shape[0] + block - 1) // block
            q = wo.pad_tensor(q, block, k_blocks)
            q, s, zp = wo.quant_tensor(q.T, 4, block, scheme, "uint")
            new, inits = wo.make_matmul_weight_only_node(
                node=node, weight_shape=weight.shape, num_bits=4, group_size=block,
                k_blocks=k_blocks, q_weight=q.astype("uint8"), scale=s.astype(weight.dtype),
                zero_point=zp if scheme == "asym" else None, accuracy_level=0)
            w_init = model.get_initializer(node.input[1])
            shared = model.get_initializer_share_num(node.input[1])
            model.add_initializers(inits)
            model.remove_node(node)
            model.add_node(new)
            if shared == 1:
                model.remove_initializer(w_init)
    del model.model.graph.output[:]
    model.model.graph.output.extend(org_output)
    model.topological_sort()
    return model.model


def ort_quantize(algo: str, block: int, sym: bool, proto: Any,
                 reader: CalibReader | None = None) -> Any:
    """Quantize every float MatMul of ``proto`` (4-bit, ``block``, sym/asym) with onnxruntime;
    returns the new ModelProto (``proto`` itself may be modified)."""
    import torch
    from onnxruntime.quantization import matmul_nbits_quantizer as mq
    torch.set_num_threads(THREADS)                  # HQQ runs in torch
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    if algo == "gptq":
        return ort_gptq(proto, reader, block, sym)
    make = {"default": lambda: mq.DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=sym, accuracy_level=0, bits=4),
            "rtn": lambda: mq.RTNWeightOnlyQuantConfig(),
            "hqq": lambda: mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
            "gptq-ort": lambda: mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)}
    q = mq.MatMulNBitsQuantizer(proto, bits=4, block_size=block, is_symmetric=sym,
                                accuracy_level=0, algo_config=make[algo]())
    with contextlib.redirect_stdout(io.StringIO()):     # INC's progress bar
        q.process()
    return q.model.model


def _mnb_initializers(proto: Any) -> dict[str, np.ndarray]:
    """Every MatMulNBits node's B / scales / zero points, by node output name."""
    from onnx import numpy_helper
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for k, name in zip(("B", "scales", "zp"), node.input[1:4]):
                out[f"{node.output[0]}:{k}"] = numpy_helper.to_array(inits[name])
    return out


def check_ort_gptq(proto_a: Any, proto_b: Any, reader: CalibReader, block: int,
                   sym: bool) -> dict[str, Any]:
    """Quantize two copies of the FP graph with ``ort_gptq`` and with the unmodified driver on
    the same samples; count the MatMulNBits initializers that differ."""
    a = _mnb_initializers(ort_gptq(proto_a, reader, block, sym))
    b = _mnb_initializers(ort_quantize("gptq-ort", block, sym, proto_b, reader))
    if set(a) != set(b):
        return {"ok": False, "why": f"different nodes ({len(a)} vs {len(b)})"}
    diff = {k: float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
            for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])}
    codes = [k for k in diff if k.endswith(":B")]
    return {"ok": not diff, "tensors": len(a), "differ": len(diff), "codes_differ": len(codes),
            "max_abs_diff": max(diff.values(), default=0.0)}


def _by_linear(path: str) -> dict[str, list[Any]]:
    """MatMulNBits B / scales / zero points (None if absent) keyed by the linear's name, for
    qexport's (``X.qweight``) and onnxruntime's (``X.weight_t_Q4G32`` ...) naming alike."""
    import re

    import onnx
    from onnx import numpy_helper
    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            names = list(node.input[1:4]) + [""] * (4 - len(node.input))
            key = re.sub(r"\.(qweight|weight_t.*)$", "", node.input[1])
            out[key] = [numpy_helper.to_array(inits[n]) if n else None for n in names]
    return out


def same_initializers(path_a: str, path_b: str) -> dict[str, Any]:
    """How many linears of two 4-bit MatMulNBits graphs hold identical B / scales / zero points
    (scales compared after flattening: HQQ stores them 1-D; absent zero points count as
    identical), and the fraction of packed codes (padding included) that differ."""
    a, b = _by_linear(path_a), _by_linear(path_b)
    res: dict[str, Any] = {"linears": len(a), "common": len(set(a) & set(b)), "B": 0,
                           "scales": 0, "zp": 0}
    codes = differ = 0
    for k in set(a) & set(b):
        if a[k][0].shape == b[k][0].shape:          # 4-bit codes: both nibbles of each byte
            x, y = a[k][0], b[k][0]
            differ += int(((x & 15) != (y & 15)).sum() + ((x >> 4) != (y >> 4)).sum())
            codes += 2 * x.size
        for i, what in enumerate(("B", "scales", "zp")):
            x, y = a[k][i], b[k][i]
            if x is None or y is None:
                res[what] += x is None and y is None
            elif x.size == y.size and np.array_equal(x.ravel(), y.ravel()):
                res[what] += 1
    res["codes_differ_fraction"] = differ / codes if codes else None
    return res
