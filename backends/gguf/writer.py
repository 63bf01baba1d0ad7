"""Lower a QModel to one whole-model ``.gguf`` file (llama.cpp), without changing a value.

| IR content                        | GGUF tensor                                          |
|-----------------------------------|------------------------------------------------------|
| QTensor on a GGUF spec            | packed blocks (``pack.pack_tensor``), its ggml type  |
| QTensor on any other spec         | LoweringError naming the tensor and the valid types  |
| 1-D passthrough (norms, biases)   | F32                                                  |
| 2-D passthrough (embedding, ...)  | F16 when every value is exactly fp16, else F32       |
| ``lm_head`` absent (tied)         | no ``output.weight`` (llama.cpp reuses token_embd)   |

Q/K rows (weights, biases, codes and every grid array) are permuted to GGML's interleaved RoPE
order for the ``llama`` architecture before packing; blocks run along rows, so permuting rows
of codes and grid parameters is exact. A LoRC residual is *not* in the base file: it lowers to
a GGUF LoRA adapter (:mod:`.lora`), so the base file holds ``dequantize(with_residual=False)``.
Metadata: ``general.architecture`` (``llama`` for Llama/Mistral, ``qwen2``), the converter's
hyper-parameter keys, ``general.file_type`` (from the recipe), ``general.quantization_version``
2, ``general.alignment`` 32, and the tokenizer (:mod:`.vocab`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from qexport.atomic import atomic_output
from qexport.errors import LoweringError, UnsupportedError
from qexport.grids import Grid, GridSpec, grid_from_arrays
from qexport.ir import QModel, QTensor
from qexport.irstream import tensor_meta

from .names import gguf_arch, hf_to_gguf, layer_index, permute_rows, rope_heads
from .pack import pack_tensor
from .recipes import RECIPES, recipe_file_type
from .types import GGUF_TYPES, type_for_spec
from .vocab import add_tokenizer

__all__ = ["lower_gguf", "plan_entries", "entry_data", "file_type_for",
           "rope_theta", "ALIGNMENT"]

ALIGNMENT = 32
_LAYER_PARTS = ("input_layernorm.weight", "post_attention_layernorm.weight",
                "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                "mlp.down_proj.weight")
# when every quantized tensor has one type and the IR names no recipe
_FTYPE_OF_TYPE = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
                  "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S",
                  "Q5_K": "Q5_K_S", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base from a transformers 4.x (``rope_theta``) or 5.x (``rope_parameters``) config."""
    rp = config.get("rope_parameters") or {}
    return float(rp.get("rope_theta", config.get("rope_theta", 10000.0)))


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any]:
    rs = config.get("rope_scaling") or {}
    rp = config.get("rope_parameters") or {}
    merged = {**rs, **{k: v for k, v in rp.items() if k != "rope_theta"}}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    return {**merged, "rope_type": kind}


def _head_dim(config: dict[str, Any]) -> int:
    hd = config.get("head_dim")
    return int(hd) if hd else int(config["hidden_size"]) // int(config["num_attention_heads"])


def _llama3_rope_freqs(config: dict[str, Any], rs: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling (``rope_freqs.weight``), float32."""
    dim, base = _head_dim(config), rope_theta(config)
    factor = float(rs.get("factor", 8.0))
    lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", 8192))
    out = []
    for k in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (k / dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def add_hparams(w: gguf.GGUFWriter, config: dict[str, Any]) -> np.ndarray | None:
    """The converter's hyper-parameter keys; returns a ``rope_freqs`` tensor when needed."""
    try:
        n_head = int(config["num_attention_heads"])
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(int(config["vocab_size"]))
    except KeyError as e:
        raise LoweringError(f"config.json: missing {e.args[0]!r} needed for GGUF metadata") from e
    w.add_rope_freq_base(rope_theta(config))
    hd = _head_dim(config)
    w.add_rope_dimension_count(hd)
    if config.get("head_dim"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    rs = _rope_scaling(config)
    if rs["rope_type"] == "default":
        return None
    if rs["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
        return None
    if rs["rope_type"] == "llama3":
        return _llama3_rope_freqs(config, rs)
    raise UnsupportedError(f"config.json: RoPE scaling {rs['rope_type']!r}: GGUF export "
                           "handles default, linear and llama3")


def file_type_for(model: QModel, types: list[str]) -> int:
    """``general.file_type``: the IR recipe's (``Q4_K_M`` or ``gguf:Q4_K_M``) when it is a
    llama.cpp recipe, else derived from the tensor types (one type -> its file type; none
    quantized -> F16/F32)."""
    name = str(model.recipe.get("name", "")).split(":")[-1].upper()
    if name in RECIPES:
        return recipe_file_type(name)
    quant = sorted({t for t in types if t not in ("F32", "F16")})
    if not quant:
        return int(gguf.LlamaFileType.MOSTLY_F16 if "F16" in types
                   else gguf.LlamaFileType.ALL_F32)
    counts = {t: types.count(t) for t in quant}
    main = max(counts, key=lambda t: counts[t])
    return recipe_file_type(_FTYPE_OF_TYPE[main])


def _permute_grid(grid: Grid, n_head: int) -> Grid:
    return grid_from_arrays(grid.kind, {k: permute_rows(v, n_head)
                                        for k, v in grid.arrays().items()})


def _packed(name: str, qt: QTensor, n_head: int | None) -> np.ndarray:
    """Packed blocks of ``qt`` (its type already checked by :func:`_quant_entry`)."""
    codes, grid = qt.codes, qt.grid
    if n_head is not None:
        codes, grid = permute_rows(codes, n_head), _permute_grid(grid, n_head)
    return pack_tensor(codes, grid, qt.spec, name)


def _order(name: str) -> tuple[int, int, str]:
    g = hf_to_gguf(name)
    li = layer_index(name)
    first = 0 if g == "token_embd.weight" else 2 if li is None else 1
    return first, li if li is not None else 0, g


def _check_complete(model: QModel) -> None:
    have = set(model.tensors) | set(model.passthrough)
    want = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(int(model.config["num_hidden_layers"])):
        want += [f"model.layers.{i}.{p}" for p in _LAYER_PARTS]
    missing = [n for n in want if n not in have]
    if missing:
        raise LoweringError(f"{missing[0]}: missing from the IR ({len(missing)} tensors missing);"
                            " a GGUF model needs every embedding, norm and layer weight")


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file, planned before any data is written (so the header can go first
    and the data can follow one tensor at a time)."""

    name: str                   # IR name
    gname: str                  # GGUF name
    type: str                   # ggml type name
    shape: tuple[int, ...]      # stored array shape (bytes per row for quantized types)
    dtype: np.dtype
    heads: int | None           # RoPE heads to permute rows by (q/k of ``llama``), else None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def _float_type(name: str, arr: np.ndarray) -> str:
    if name.endswith(("norm.weight", ".bias")) or arr.ndim < 2:
        return "F32"
    a = np.asarray(arr, dtype=np.float32)
    h = a.astype(np.float16)
    ok = np.all(np.isfinite(a)) and np.array_equal(h.astype(np.float32), a)
    return "F16" if ok else "F32"


def _quant_entry(name: str, spec: GridSpec, shape: tuple[int, ...], heads: int | None) -> _Entry:
    try:
        row = type_for_spec(spec)
    except UnsupportedError as e:
        raise LoweringError(f"{name}: spec {spec.name!r} is not a GGUF type; expected one "
                            f"of {', '.join(t.spec.name for t in GGUF_TYPES.values())} "
                            f"({', '.join(GGUF_TYPES)})") from e
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[row.name]]
    rows, cols = shape
    if cols % bs:
        raise LoweringError(f"{name}: row length expected a multiple of {bs} for {row.name} "
                            f"(not {cols})")
    return _Entry(name, hf_to_gguf(name), row.name, (rows, cols // bs * ts), np.dtype(np.uint8),
                  heads)


def plan_entries(model: QModel) -> list[_Entry]:
    """Every tensor of the file in file order (token_embd, layers, output_norm, output), with
    its type and stored size. Reads float passthrough tensors one at a time (F16 when every
    value is exactly fp16) and no quantized data."""
    _check_complete(model)
    out = []
    for name in sorted(set(model.tensors) | set(model.passthrough), key=_order):
        heads = rope_heads(name, model.config)
        if name in model.tensors:
            spec, shape, _ = tensor_meta(model.tensors, name)
            out.append(_quant_entry(name, spec, shape, heads))
            continue
        arr = model.passthrough[name]
        t = _float_type(name, arr)
        out.append(_Entry(name, hf_to_gguf(name), t, tuple(arr.shape),
                          np.dtype(np.float16 if t == "F16" else np.float32), heads))
        del arr
    return out


def entry_data(model: QModel, e: _Entry) -> np.ndarray:
    """The bytes of one planned tensor: packed blocks ``uint8 [out, row_bytes]`` or F16/F32."""
    if e.dtype == np.uint8:
        return _packed(e.name, model.tensors[e.name], e.heads)
    a = np.ascontiguousarray(model.passthrough[e.name], dtype=np.float32)
    if e.heads is not None:
        a = permute_rows(a, e.heads)
    return np.ascontiguousarray(a.astype(e.dtype))


def _add_info(w: gguf.GGUFWriter, e: _Entry) -> None:
    raw = None if e.type in ("F32", "F16") else gguf.GGMLQuantizationType[e.type]
    w.add_tensor_info(e.gname, e.shape, e.dtype, e.nbytes, raw_dtype=raw)


def _write_data(w: gguf.GGUFWriter, e: _Entry, data: np.ndarray) -> None:
    if data.nbytes != e.nbytes or data.dtype != e.dtype:
        raise LoweringError(f"{e.name}: packed {data.dtype} data expected {e.nbytes} bytes "
                            f"(not {data.nbytes})")
    w.write_tensor_data(data)


def lower_gguf(model: QModel, path: str | os.PathLike, *, force: bool = False,
               bpe_pre: str | None = None, name: str | None = None,
               progress: bool = False) -> Path:
    """Write ``model`` as one llama.cpp ``.gguf`` file at ``path`` (atomically).

    Args:
        model: the IR; every QTensor must be on a GGUF spec (``types.spec_for``).
        path: output file; an existing one is replaced only with ``force``.
        bpe_pre: llama.cpp pre-tokenizer name for a byte-level BPE ``tokenizer.json`` whose
            pre-tokenizer is not plain GPT-2 (``tokenizer.ggml.pre``).
        name: ``general.name`` (default: the IR's ``provenance["source"]`` or "qexport").
        progress: a progress bar over the tensors (on a terminal only).
    Raises:
        LoweringError: a tensor on a non-GGUF spec or an incomplete IR.
        UnsupportedError: architecture, RoPE scaling or tokenizer that cannot be expressed.
    """
    arch = gguf_arch(model.config)
    entries = plan_entries(model)
    ftype = file_type_for(model, [e.type for e in entries])
    path = Path(path)
    with atomic_output(path, is_dir=False, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            w.add_name(name or str(model.provenance.get("source") or "qexport"))
            w.add_custom_alignment(ALIGNMENT)
            rope_freqs = add_hparams(w, model.config)
            w.add_file_type(ftype)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_tokenizer(w, model.tokenizer, model.config, bpe_pre=bpe_pre)
            if rope_freqs is not None:
                w.add_tensor_info("rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype,
                                  rope_freqs.nbytes)
            for e in entries:
                _add_info(w, e)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            if rope_freqs is not None:
                w.write_tensor_data(rope_freqs)
            # one tensor in memory at a time (the IR may be lazy: load_ir(lazy=True))
            for e in tqdm(entries, desc="gguf", unit="tensor", disable=None if progress else True):
                _write_data(w, e, entry_data(model, e))
        finally:
            w.close()
    return path
