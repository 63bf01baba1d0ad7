"""Verify a ``.gguf`` file against its IR: every tensor bit for bit, and the metadata.

Each quantized tensor is decoded twice, independently: by qexport's own unpacker
(``decode.unpack_tensor`` -> codes + grid -> ``grids.dequantize``) and by gguf-py
(``gguf.quants.dequantize``); both, after undoing the Q/K RoPE row permutation, must equal
``QTensor.dequantize(with_residual=False)`` exactly (a LoRC residual lives in the adapter), and
the unpacked codes must equal the IR's codes. Float tensors are compared exactly as stored.
Mismatches never raise: the report's ``ok`` is False (the CLI exits 1); unreadable files raise
InputError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from qexport.errors import UnsupportedError, VerifyError
from qexport.grids import dequantize
from qexport.ir import QModel

from .decode import unpack_tensor
from .names import gguf_arch, gguf_to_hf, rope_heads, unpermute_rows
from .reader import open_gguf
from .types import type_for_spec
from .writer import file_type_for

__all__ = ["VerifyRow", "VerifyReport", "verify_gguf"]


@dataclass
class VerifyRow:
    """One tensor: HF name, GGUF name, stored type, max |decoded - IR| over both decoders,
    whether both decoders (and the codes) match exactly, and a note on what differed."""

    name: str
    gguf_name: str
    type: str
    max_abs_diff: float
    equal: bool
    note: str = ""


@dataclass
class VerifyReport:
    ok: bool
    rows: list[VerifyRow] = field(default_factory=list)
    meta: list[tuple[str, Any, Any, bool]] = field(default_factory=list)  # key, want, got, ok
    compared: str = ("every tensor decoded by qexport's unpacker and by gguf.quants.dequantize, "
                     "Q/K permutation undone, compared bit for bit with the IR "
                     "(without LoRC residuals); metadata keys; tokenizer presence")

    def failures(self) -> list[str]:
        out = [f"{r.gguf_name}: {r.note or 'differs'} (max |diff| {r.max_abs_diff:g})"
               for r in self.rows if not r.equal]
        out += [f"metadata {k}: expected {w!r} (found {g!r})" for k, w, g, ok in self.meta
                if not ok]
        return out


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nanmax(d)) if d.size else 0.0


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def _check_quantized(model: QModel, name: str, t: Any, heads: int | None) -> VerifyRow:
    qt = model.tensors[name]
    want = qt.dequantize(with_residual=False)
    row = VerifyRow(name, t.name, t.tensor_type.name, 0.0, True)
    try:
        want_type = type_for_spec(qt.spec).name
    except UnsupportedError:
        want_type = f"<spec {qt.spec.name}>"
    if t.tensor_type.name != want_type:
        row.equal, row.note = False, f"type {t.tensor_type.name}, IR expects {want_type}"
        return row
    shape = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else None
    if shape != qt.shape:
        row.equal, row.max_abs_diff = False, float("inf")
        row.note = f"shape {shape}, IR has {qt.shape}"
        return row
    raw = np.asarray(t.data)
    undo = (lambda a: unpermute_rows(a, heads)) if heads else (lambda a: a)
    notes = []
    try:
        codes, grid = unpack_tensor(raw, t.tensor_type.name, shape)
        ours = undo(dequantize(codes, grid, qt.spec))
        if not _same(undo(codes), qt.codes):
            notes.append("codes differ")
    except VerifyError as e:
        ours, notes = np.full(shape, np.nan, np.float32), [f"unpack failed: {e}"]
    theirs = undo(gguf.quants.dequantize(raw, t.tensor_type).reshape(shape).astype(np.float32))
    row.max_abs_diff = max(_max_diff(ours, want), _max_diff(theirs, want))
    if not _same(ours, want):
        notes.append("qexport decoder differs from IR")
    if not _same(theirs, want):
        notes.append("gguf-py decoder differs from IR")
    row.equal, row.note = not notes, "; ".join(notes)
    return row


def _check_float(model: QModel, name: str, t: Any, heads: int | None) -> VerifyRow:
    want = model.passthrough[name]
    row = VerifyRow(name, t.name, t.tensor_type.name, 0.0, True)
    if t.tensor_type.name not in ("F32", "F16"):
        row.equal, row.note = False, f"type {t.tensor_type.name}, IR holds it unquantized"
        return row
    got = np.asarray(t.data).astype(np.float32).reshape(want.shape) \
        if np.asarray(t.data).size == want.size else None
    if got is None:
        row.equal, row.max_abs_diff, row.note = False, float("inf"), "size differs from IR"
        return row
    if heads:
        got = unpermute_rows(got, heads)
    row.max_abs_diff = _max_diff(got, want)
    row.equal = _same(got, want)
    row.note = "" if row.equal else "values differ from IR"
    return row


def _meta_checks(model: QModel, r: gguf.GGUFReader, n_tokens_embd: int | None,
                 types: list[str]) -> list[tuple[str, Any, Any, bool]]:
    cfg = model.config

    def get(key: str) -> Any:
        f = r.fields.get(key)
        return None if f is None else f.contents()

    arch = gguf_arch(cfg)
    n_head = int(cfg["num_attention_heads"])
    want = {"general.architecture": arch,
            f"{arch}.block_count": int(cfg["num_hidden_layers"]),
            f"{arch}.embedding_length": int(cfg["hidden_size"]),
            f"{arch}.feed_forward_length": int(cfg["intermediate_size"]),
            f"{arch}.attention.head_count": n_head,
            f"{arch}.attention.head_count_kv": int(cfg.get("num_key_value_heads") or n_head),
            "general.file_type": file_type_for(model, types),
            "general.quantization_version": gguf.GGML_QUANT_VERSION}
    out = [(k, v, get(k), get(k) == v) for k, v in want.items()]
    tm = get("tokenizer.ggml.model")
    out.append(("tokenizer.ggml.model", "present", tm, tm is not None))
    tok = r.fields.get("tokenizer.ggml.tokens")
    n_tok = len(tok.data) if tok is not None else None
    out.append(("tokenizer.ggml.tokens (count = token_embd rows)", n_tokens_embd, n_tok,
                n_tok is not None and n_tok == n_tokens_embd))
    return out


def verify_gguf(path: str | os.PathLike, model: QModel) -> VerifyReport:
    """Compare the GGUF at ``path`` with ``model`` (see module doc); never raises on mismatch."""
    r = open_gguf(path)
    report = VerifyReport(ok=True)
    seen: set[str] = set()
    n_embd_rows = None
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        try:
            name = gguf_to_hf(t.name)
        except UnsupportedError:
            report.rows.append(VerifyRow("?", t.name, t.tensor_type.name, float("inf"), False,
                                         "tensor not in the IR"))
            continue
        seen.add(name)
        if t.name == "token_embd.weight":
            n_embd_rows = int(t.shape[-1])
        heads = rope_heads(name, model.config)
        if name in model.tensors:
            report.rows.append(_check_quantized(model, name, t, heads))
        elif name in model.passthrough:
            report.rows.append(_check_float(model, name, t, heads))
        else:
            report.rows.append(VerifyRow(name, t.name, t.tensor_type.name, float("inf"), False,
                                         "tensor not in the IR"))
    for name in sorted((set(model.tensors) | set(model.passthrough)) - seen):
        report.rows.append(VerifyRow(name, "-", "-", float("inf"), False, "missing from file"))
    types = [t.tensor_type.name for t in r.tensors if t.name != "rope_freqs.weight"]
    report.meta = _meta_checks(model, r, n_embd_rows, types)
    report.ok = all(x.equal for x in report.rows) and all(m[3] for m in report.meta)
    return report
