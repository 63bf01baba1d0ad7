"""The IR: QModel, QTensor, LowRank (DESIGN §4). In-memory types only; see irio.py for the
folder format.

A QTensor is one quantized linear weight ``W [out, in]`` (the source model's name and logical
orientation) as uint8 ``codes`` in original column order, a grid (qexport.grids) that satisfies
its GridSpec, and an optional LoRC residual ``A @ B``. Its value is
``dequantize(codes, grid, spec) + A @ B`` (fp32).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qexport.errors import IRError
from qexport.grids import (Grid, GridError, GridSpec, check_representable, dequantize,
                           grid_nbytes_bits, validate)

IR_VERSION = 1
__all__ = ["IR_VERSION", "LowRank", "QTensor", "QModel"]


@dataclass
class LowRank:
    """Residual factors of ``W - dequant(Q)``: ``A`` float32 ``[out, r]``, ``B`` float32
    ``[r, in]``, values representable in ``dtype`` ("fp16" or "fp32")."""

    A: np.ndarray
    B: np.ndarray
    dtype: str = "fp16"

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def matrix(self) -> np.ndarray:
        return (self.A.astype(np.float32) @ self.B.astype(np.float32)).astype(np.float32)

    def nbits(self) -> int:
        return (self.A.size + self.B.size) * {"fp16": 16, "fp32": 32, "bf16": 16}[self.dtype]

    def validate(self, shape: tuple[int, int], where: str) -> None:
        out_f, in_f = shape
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != out_f \
                or self.B.shape[1] != in_f or self.A.shape[1] != self.B.shape[0]:
            raise IRError(f"{where}.residual: expected A [{out_f}, r] and B [r, {in_f}] "
                          f"(found A {list(self.A.shape)}, B {list(self.B.shape)})")
        try:
            check_representable(self.A, self.dtype, f"{where}.residual.A")
            check_representable(self.B, self.dtype, f"{where}.residual.B")
        except GridError as e:
            raise IRError(str(e)) from e


@dataclass
class QTensor:
    """A quantized weight.

    Attributes:
        name: source model tensor name (``model.layers.0.self_attn.q_proj.weight``).
        codes: uint8 ``[out, in]``, original column order (act-order undone).
        grid: per-group parameters (AffineGrid | SuperBlockGrid | CodebookGrid).
        spec: the GridSpec the codes and grid satisfy.
        residual: optional LoRC factors.
        stats: free-form numbers recorded by the method (objective, damp used, ...).
    """

    name: str
    codes: np.ndarray
    grid: Grid
    spec: GridSpec
    residual: LowRank | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def validate(self) -> None:
        try:
            validate(self.codes, self.grid, self.spec, self.name)
        except GridError as e:
            raise IRError(str(e)) from e
        if self.residual is not None:
            self.residual.validate(self.shape, self.name)

    def dequantize(self, with_residual: bool = True) -> np.ndarray:
        """float32 ``[out, in]``: the value every backend and runtime must reproduce."""
        w = dequantize(self.codes, self.grid, self.spec)
        if with_residual and self.residual is not None:
            w = w + self.residual.matrix()
        return w

    def bits(self) -> dict[str, int]:
        """Storage in bits: codes, grid parameters and residual factors."""
        n = self.codes.size
        return {"codes": n * self.spec.bits, "grid": grid_nbytes_bits(self.grid, self.spec),
                "residual": self.residual.nbits() if self.residual is not None else 0}

    def bits_per_weight(self) -> float:
        return sum(self.bits().values()) / self.codes.size


@dataclass
class QModel:
    """A quantized model.

    Attributes:
        config: the Hugging Face ``config.json`` dict (architecture hyper-parameters).
        tensors: quantized linears by source name.
        passthrough: float32 arrays kept unquantized (norms, embeddings, biases) by name.
        tokenizer: tokenizer files by file name (``tokenizer.json``, ``gguf_vocab.json``, ...).
        recipe: how per-tensor formats were chosen (``{"name": ..., "tensors": {name: note}}``).
        provenance: method, hyper-parameters, calibration hash, qexport version.
    """

    config: dict[str, Any]
    tensors: dict[str, QTensor] = field(default_factory=dict)
    passthrough: dict[str, np.ndarray] = field(default_factory=dict)
    tokenizer: dict[str, bytes] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    ir_version: int = IR_VERSION

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["?"]
        return str(archs[0])

    def validate(self) -> None:
        clash = set(self.tensors) & set(self.passthrough)
        if clash:
            raise IRError(f"{sorted(clash)[0]}: present both as quantized and passthrough")
        for name in self.tensors:            # one at a time (tensors may be read lazily)
            self.tensors[name].validate()
        for name, arr in self.passthrough.items():
            if arr.dtype != np.float32:
                raise IRError(f"{name}: passthrough expected float32 (not {arr.dtype})")

    def state_dict(self, with_residual: bool = True) -> dict[str, np.ndarray]:
        """All weights as float32 arrays by source name (quantized ones dequantized)."""
        sd = dict(self.passthrough)
        for name, qt in self.tensors.items():
            sd[name] = qt.dequantize(with_residual)
        return sd

    def bits_summary(self) -> dict[str, float]:
        """Totals over quantized tensors: weights, bits and bits per weight."""
        n = sum(qt.codes.size for qt in self.tensors.values())
        b = sum(sum(qt.bits().values()) for qt in self.tensors.values())
        return {"weights": n, "bits": b, "bpw": b / n if n else 0.0}
