"""onnxruntime session creation with execution-provider choice, reporting which EP really ran.

``device="auto"`` uses CUDAExecutionProvider when onnxruntime lists it *and* a session created
with it keeps it as its first provider (onnxruntime-gpu wheels list CUDA even on machines without
a GPU and silently fall back to CPU); otherwise CPUExecutionProvider.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import onnxruntime as ort

from qexport.errors import UnsupportedError

__all__ = ["CPU", "CUDA", "cuda_available", "make_session", "DEVICES"]

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def _options(threads: int | None, quiet: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    n = threads or int(os.environ.get("QEXPORT_ORT_THREADS", "0") or 0)
    if n:
        so.intra_op_num_threads = n
        so.inter_op_num_threads = 1
    if quiet:
        so.log_severity_level = 3
    return so


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA EP session can actually be created on this machine."""
    if CUDA not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ort.set_default_logger_severity(4)      # a missing CUDA runtime is an answer, not an error
    try:
        s = ort.InferenceSession(m.SerializeToString(), _options(1, True), providers=[CUDA, CPU])
    except Exception:  # noqa: BLE001 - any failure to bring up CUDA means "no CUDA here"
        return False
    finally:
        ort.set_default_logger_severity(2)
    return s.get_providers()[0] == CUDA


def make_session(model: str | Path | bytes, device: str = "auto", *,
                 threads: int | None = None) -> tuple[ort.InferenceSession, str]:
    """Create an InferenceSession; returns it and the provider that runs it (CPU or CUDA EP).

    Args:
        model: path of model.onnx (external data beside it) or serialized bytes.
        device: "auto" (CUDA when usable), "cpu", or "cuda" (UnsupportedError if unusable).
        threads: intra-op threads (default: env QEXPORT_ORT_THREADS, else onnxruntime's).
    """
    if device not in DEVICES:
        raise UnsupportedError(f"device: expected one of {list(DEVICES)} (not {device!r})")
    src = model if isinstance(model, bytes) else str(model)
    want_cuda = device == "cuda" or (device == "auto" and cuda_available())
    if device == "cuda" and not cuda_available():
        raise UnsupportedError(f"device 'cuda': CUDAExecutionProvider is not usable here "
                               f"(available: {ort.get_available_providers()}); use 'cpu'")
    providers = [CUDA, CPU] if want_cuda else [CPU]
    sess = ort.InferenceSession(src, _options(threads, False), providers=providers)
    ran = sess.get_providers()[0]
    if device == "cuda" and ran != CUDA:
        raise UnsupportedError(f"device 'cuda': the session fell back to {ran}")
    return sess, ran
