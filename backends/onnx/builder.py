"""A small ONNX graph builder over ``onnx.helper``: unique names, initializers, constants.

Every op returns its output name(s), so graph code reads like the computation it emits.

With ``external`` (an open data file and its name) every initializer of at least
:data:`EXTERNAL_THRESHOLD` bytes goes to that file as soon as it is added and the graph keeps
only its location, so building a graph holds one weight at a time. The file and the tensor
entries are what ``onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True,
size_threshold=1024)`` writes (onnx 1.23: initializers in graph order, back to back, over the
threshold by ``sys.getsizeof`` of the raw bytes).
"""
from __future__ import annotations

import sys
from typing import Any, BinaryIO, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from qexport.errors import LoweringError

__all__ = ["GraphBuilder", "OPSET", "MS_DOMAIN", "np_to_onnx_dtype", "EXTERNAL_THRESHOLD"]

#: onnx.save_model's default size_threshold (compared with sys.getsizeof(raw_data))
EXTERNAL_THRESHOLD = 1024
_BYTES_OVERHEAD = sys.getsizeof(b"")      # sys.getsizeof(raw bytes) = this + len

_FP16_MAX = 65504.0
OPSET = 18           # BitwiseAnd / BitShift (quantized embeddings), ReduceMean with axes input
MS_DOMAIN = "com.microsoft"

_NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
            np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL}


def np_to_onnx_dtype(dt: Any) -> int:
    return _NP2ONNX[np.dtype(dt)]


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one graph."""

    def __init__(self, external: tuple[BinaryIO, str] | None = None) -> None:
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    # ---- values ----------------------------------------------------------------------
    def initializer(self, name: str, arr: np.ndarray) -> str:
        """Add ``arr`` as an initializer under a unique name derived from ``name``."""
        name = self.unique(name)
        arr = np.array(arr, order="C")          # a C-order copy that keeps 0-d arrays 0-d
        if self.external is not None and arr.nbytes + _BYTES_OVERHEAD >= EXTERNAL_THRESHOLD:
            self.initializers.append(self._external(name, arr))
        else:
            self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def _external(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        """Write ``arr``'s little-endian bytes to the data file; a TensorProto that points there.
        Built without ``raw_data`` (protobuf keeps a cleared field's memory in the message)."""
        f, location = self.external
        offset = f.tell()
        f.write(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
        t = onnx.TensorProto(name=name, dims=arr.shape,
                             data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.raw_data = b""                    # set_external_data asks for the field
        set_external_data(t, location, offset, f.tell() - offset)
        t.ClearField("raw_data")
        return t

    def float_init(self, name: str, arr: np.ndarray, np_dt: Any) -> str:
        """A float initializer in the graph dtype; refuses values the dtype cannot hold."""
        a = np.asarray(arr, dtype=np.float32)
        if np.dtype(np_dt) == np.float16:
            big = np.isfinite(a) & (np.abs(a) > _FP16_MAX)
            if np.any(big):
                raise LoweringError(f"{name}: expected |values| <= {_FP16_MAX} for the fp16 graph "
                                    f"(found {float(np.abs(a[big]).max())!r}); export fp32")
        return self.initializer(name, a.astype(np_dt))

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer (shared between uses)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer("const", arr)
        return self._consts[key]

    def input(self, name: str, elem: int, shape: Sequence[int | str]) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, elem: int, shape: Sequence[int | str] | None) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    # ---- nodes -----------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, *, name: str | None = None,
           outputs: Sequence[str] | None = None, domain: str = "", **attrs: Any) -> Any:
        """Emit one node; returns its output name (or a list when ``n_out > 1``)."""
        base = name or op_type
        node_name = self.unique(f"/{base}")
        if outputs is None:
            outputs = [self.unique(f"{node_name}/out{i}") for i in range(n_out)]
        else:
            for o in outputs:
                self._names.add(o)
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=node_name,
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def model(self, graph_name: str = "qexport", producer: str = "qexport",
              metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  self.initializers)
        m = helper.make_model(graph, producer_name=producer,
                              opset_imports=[helper.make_opsetid("", OPSET),
                                             helper.make_opsetid(MS_DOMAIN, 1)])
        m.ir_version = 9
        for k, v in (metadata or {}).items():
            m.metadata_props.add(key=k, value=v)
        return m
