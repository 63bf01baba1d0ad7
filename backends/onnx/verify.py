"""``verify_onnx``: check an ONNX folder against its IR.

1. Bit level: every MatMulNBits weight (and a quantized embedding's table) is decoded with
   decode.py and compared with ``qexport.grids.dequantize`` of the IR tensor bit for bit (codes,
   zero points and float32 values); no node may carry ``g_idx``; LoRC factors must equal the IR's.
2. Runtime: the graph runs in onnxruntime (CUDA EP when usable, else CPU; the report says which)
   on a few seeded token sequences, full-sequence and with the KV cache, against a transformers
   ``<Arch>ForCausalLM`` holding ``QModel.state_dict()`` in fp32. The difference is reported as
   ``max |logits_onnx - logits_ref| / max |logits_ref|``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qexport.errors import VerifyError
from qexport.grids import dequantize
from qexport.ir import QModel

from .arch import decoder_config
from .decode import decode_mnb, decode_mnb_codes, decode_mnb_zero_points
from .genai import MODEL_FILE
from .runner import OnnxDecoder, reference_logits

__all__ = ["VerifyReport", "verify_onnx", "default_tolerance"]


@dataclass
class VerifyReport:
    ok: bool
    provider: str
    dtype: str
    accuracy_level: int
    tensors_checked: int
    tensors_bitexact: int
    max_rel_logit_diff: float
    max_rel_cache_diff: float
    tolerance: float
    sequences: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (sequence lengths instead of the token ids) plus the summary."""
        d = {k: v for k, v in asdict(self).items() if k != "sequences"}
        d["sequence_lengths"] = [len(s) for s in self.sequences]
        d["summary"] = self.summary()
        return d

    def summary(self) -> str:
        return (f"{'OK' if self.ok else 'FAIL'}: {self.tensors_bitexact}/{self.tensors_checked} "
                f"quantized tensors bit-exact; logits vs transformers fp32 (IR weights) on "
                f"{len(self.sequences)} sequences: max rel diff {self.max_rel_logit_diff:.3g} "
                f"(tolerance {self.tolerance:g}), KV-cache vs full {self.max_rel_cache_diff:.3g};"
                f" ran on {self.provider}, {self.dtype} graph, accuracy_level "
                f"{self.accuracy_level}")


def default_tolerance(dtype: str, accuracy_level: int) -> float:
    """Relative logit tolerance: fp32 arithmetic noise, or the fp16 / int8-activation noise."""
    if accuracy_level == 4:
        return 5e-2
    return 1e-2 if dtype == "fp16" else 1e-4


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a32, b32 = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a32.shape == b32.shape and bool(np.array_equal(a32.view(np.uint32),
                                                          b32.view(np.uint32)))


def _check_tensor(name: str, qt, inits: dict[str, np.ndarray], attrs: dict[str, Any] | None,
                  errors: list[str]) -> None:
    prefix = name.removesuffix(".weight")
    B = inits.get(f"{prefix}.qweight")
    scales = inits.get(f"{prefix}.scales")
    if B is None or scales is None:
        errors.append(f"{name}: no MatMulNBits initializers {prefix}.qweight/.scales in the graph")
        return
    N, K = qt.shape
    bits, bs = (attrs["bits"], attrs["block_size"]) if attrs else (qt.spec.bits,
                                                                    qt.spec.group_size)
    if attrs and (attrs["K"], attrs["N"]) != (K, N):
        errors.append(f"{name}: MatMulNBits K,N expected {K},{N} (not {attrs['K']},{attrs['N']})")
        return
    zp = inits.get(f"{prefix}.qzeros")
    codes = decode_mnb_codes(B, K, N, bits, bs)
    if not np.array_equal(codes, qt.codes):
        errors.append(f"{name}: packed codes differ from the IR at "
                      f"{int(np.sum(codes != qt.codes))} positions")
    kb = -(-K // bs)
    if getattr(qt.grid, "zeros", None) is not None:
        if zp is None or not np.array_equal(decode_mnb_zero_points(zp, N, kb, bits),
                                            qt.grid.zeros):
            errors.append(f"{name}: zero points differ from the IR")
    elif zp is not None:
        errors.append(f"{name}: unexpected zero points for a symmetric spec {qt.spec.name}")
    W = decode_mnb(B, scales, zp, K, N, bits, bs)
    if not _bits_equal(W, dequantize(qt.codes, qt.grid, qt.spec)):
        errors.append(f"{name}: decoded weights are not bit-identical to the IR's dequantize")
    if qt.residual is not None:
        bt, at = inits.get(f"{prefix}.lorc_b_t"), inits.get(f"{prefix}.lorc_a_t")
        if at is None:
            at, bt = inits.get(f"{prefix}.lorc_a"), inits.get(f"{prefix}.lorc_b")
            at, bt = (at.T if at is not None else None), (bt.T if bt is not None else None)
        if at is None or bt is None or not (_bits_equal(at.T, qt.residual.A)
                                            and _bits_equal(bt.T, qt.residual.B)):
            errors.append(f"{name}: LoRC factors missing or different from the IR")


def check_weights(proto: onnx.ModelProto, model: QModel) -> tuple[int, list[str]]:
    """Bit-level checks; returns (tensors checked, error messages)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    errors: list[str] = []
    attrs_by_b: dict[str, dict[str, Any]] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        if len(node.input) > 4 and node.input[4]:
            errors.append(f"{node.name}: has a g_idx input (never emitted by qexport)")
        attrs_by_b[node.input[1]] = _attrs(node)
    for name, qt in sorted(model.tensors.items()):
        prefix = name.removesuffix(".weight")
        _check_tensor(name, qt, inits, attrs_by_b.get(f"{prefix}.qweight"), errors)
    return len(model.tensors), errors


def _sequences(vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in (9, 16)]


def verify_onnx(folder: str | Path, model: QModel, *, device: str = "auto",
                tolerance: float | None = None, seed: int = 0,
                sequences: list[list[int]] | None = None) -> VerifyReport:
    """Verify ``folder`` (written by lower_onnx) against ``model``; raises VerifyError on a
    bit-level mismatch, returns the report (``ok`` False when logits exceed the tolerance)."""
    folder = Path(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise VerifyError(f"{path}: not found (expected an ONNX folder from lower_onnx)")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    dtype = meta.get("qexport.dtype", "fp32")
    acc = int(meta.get("qexport.accuracy_level", "0"))
    n, errors = check_weights(proto, model)
    if errors:
        raise VerifyError(f"{folder}: {len(errors)} bit-level mismatches; first: {errors[0]}")
    del proto
    dc = decoder_config(model.config)
    seqs = sequences or _sequences(dc.vocab, seed)
    tol = default_tolerance(dtype, acc) if tolerance is None else tolerance
    dec = OnnxDecoder(path, device)
    ref_model = None
    rel, rel_cache = 0.0, 0.0
    for ids in seqs:
        logits = dec.logits([ids])
        ref, ref_model = reference_logits(model, [ids], ref_model)
        rel = max(rel, float(np.abs(logits - ref).max() / np.abs(ref).max()))
        step = dec.prefill_then_step([ids])
        rel_cache = max(rel_cache, float(np.abs(step - logits[:, -1]).max()
                                         / np.abs(logits[:, -1]).max()))
    ok = rel <= tol and rel_cache <= tol
    notes = [] if dtype == "fp32" else ["fp16 graph: passthrough weights and activations are "
                                        "fp16, the reference is fp32"]
    return VerifyReport(ok=ok, provider=dec.provider, dtype=dtype, accuracy_level=acc,
                        tensors_checked=n, tensors_bitexact=n, max_rel_logit_diff=rel,
                        max_rel_cache_diff=rel_cache, tolerance=tol, sequences=seqs, notes=notes)
