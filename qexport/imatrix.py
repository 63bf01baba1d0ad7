"""Importance matrices (llama.cpp's "imatrix"): compute one from calibration text, read and
write llama-imatrix's GGUF files, and quantize with llama.cpp's imatrix quantizers.

What an imatrix is (llama.cpp ``tools/imatrix``): for every decoder linear, the mean of the
squared input activation per input column, ``imatrix[j] = mean_t x_t[j]^2`` over the calibration
tokens. It is the diagonal of ``X^T X / n_tokens``; qexport's calibration driver already builds
``H = 2/N_seq * sum_t x_t x_t^T`` per linear group, so ``imatrix = diag(H) / (2 * seq_len)``.
llama.cpp only uses it as a per-column weight in a weighted MSE (global scale does not matter).

| llama-imatrix GGUF tensor      | shape (ggml)   | meaning                          |
|--------------------------------|----------------|----------------------------------|
| ``<gguf name>.in_sum2``        | ``[in, n_mat]``| sum of x^2 per column (float32)  |
| ``<gguf name>.counts``         | ``[1, n_mat]`` | number of rows summed (float32)  |

``llama-quantize --imatrix`` uses ``in_sum2 / counts`` computed in float32 (``load_imatrix``
in ``tools/quantize/quantize.cpp``); :func:`load_imatrix_gguf` does the same, so quantizing
with it reproduces llama-quantize's bytes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qexport.errors import InputError, NumericsError, UnsupportedError
from qexport.ir import QModel, QTensor

__all__ = ["Imatrix", "compute_imatrix", "load_imatrix_gguf", "save_imatrix_gguf",
           "quantize_rtn_imatrix", "as_stored", "imatrix_sha256", "resolve_imatrix",
           "check_imatrix", "check_imatrix_plan"]

Imatrix = dict[str, np.ndarray]        # HF weight name -> float32 [in_features]


def compute_imatrix(src: Any, calib: str | os.PathLike, *, n_samples: int = 128,
                    seq_len: int = 512, seed: int = 0, sampling: str = "random",
                    progress: bool = True) -> tuple[Imatrix, dict[str, Any]]:
    """Mean squared input activation per column of every decoder linear of ``src`` (a
    :class:`qexport.model.SourceModel`), on the unquantized model.

    Uses the same seeded calibration windows as ``--method gptq``
    (:func:`qexport.calib.load_calibration`) and the layer-by-layer driver with weights left
    unchanged, so every layer sees the float model's activations (as ``llama-imatrix`` on an
    F32 GGUF does).

    Returns:
        (imatrix: HF name -> float32 ``[in]``, calibration info of ``load_calibration`` plus
        ``"tokens"`` = ``n_samples * seq_len``).
    """
    from qexport.calib import load_calibration, quantize_layerwise
    samples, info = load_calibration(calib, src.tokenizer, n_samples=n_samples,
                                     seq_len=seq_len, seed=seed, sampling=sampling)
    out: Imatrix = {}
    denom = 2.0 * float(samples.shape[1])

    def record(name: str, W: Any, H: Any) -> Any:
        out[name] = (H.diagonal().double() / denom).numpy().astype(np.float32)
        return W

    quantize_layerwise(src, samples, record, progress=progress)
    return out, {**info, "tokens": int(samples.numel())}


def _gguf_to_hf(name: str) -> str:
    from qexport.model.gguf_source import gguf_to_hf_name
    return gguf_to_hf_name(name)


def load_imatrix_gguf(path: str | os.PathLike) -> tuple[Imatrix, dict[str, Any]]:
    """Read a llama-imatrix GGUF file (``general.type = imatrix``) as ``in_sum2 / counts``
    (float32, as llama-quantize does), keyed by HF weight name.

    Returns:
        (imatrix, metadata: ``{"chunk_count", "chunk_size", "datasets", "entries"}``).
    Raises:
        InputError: not an imatrix GGUF, or an entry without its counts.
        UnsupportedError: a per-expert (MoE) entry (``n_mat > 1``).
    """
    import gguf
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: imatrix file not found (expected a llama-imatrix GGUF file)")
    try:
        reader = gguf.GGUFReader(str(p), "r")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    except (OSError, ValueError, LookupError, OverflowError) as e:
        raise InputError(f"{p}: expected a llama-imatrix GGUF file ({e or type(e).__name__})"
                         ) from e
    sums = {n[:-len(".in_sum2")]: v for n, v in tensors.items() if n.endswith(".in_sum2")}
    if not sums:
        raise InputError(f"{p}: expected *.in_sum2 tensors (not found; legacy .dat imatrix "
                         "files are not read)")
    out: Imatrix = {}
    for gname, s in sums.items():
        c = tensors.get(f"{gname}.counts")
        if c is None:
            raise InputError(f"{p}: {gname}.in_sum2 has no {gname}.counts")
        if c.size != 1:
            raise UnsupportedError(f"{p}: {gname}: per-expert imatrix ({c.size} matrices) "
                                   "expected 1")
        count = np.float32(c.reshape(-1)[0])
        vals = s.reshape(-1) / count if count > 0 else np.ones(s.size, dtype=np.float32)
        try:
            hf = _gguf_to_hf(gname)
        except UnsupportedError as e:
            raise UnsupportedError(f"{p}: {e}") from e
        out[hf] = np.asarray(vals, dtype=np.float32)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    meta = {"chunk_count": field("imatrix.chunk_count"), "chunk_size": field("imatrix.chunk_size"),
            "datasets": field("imatrix.datasets"), "entries": len(out)}
    return out, meta


def save_imatrix_gguf(imatrix: Imatrix, path: str | os.PathLike, *, tokens: int,
                      chunk_size: int, dataset: str, force: bool = True) -> Path:
    """Write ``imatrix`` as a llama-imatrix GGUF file (``in_sum2 = imatrix * tokens``,
    ``counts = tokens``) that ``llama-quantize --imatrix`` accepts; atomically (a temp sibling
    renamed when complete). ``force=False`` refuses an existing ``path``.
    :func:`load_imatrix_gguf` of it gives :func:`as_stored` ``(imatrix, tokens)``."""
    import gguf

    from qexport.atomic import atomic_output
    from qexport.backends.gguf.names import hf_to_gguf
    p = Path(path)
    with atomic_output(p, is_dir=False, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        try:
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", [dataset])
            w.add_uint32("imatrix.chunk_count", max(1, tokens // chunk_size))
            w.add_uint32("imatrix.chunk_size", chunk_size)
            for name, v in imatrix.items():
                g = hf_to_gguf(name)
                w.add_tensor(f"{g}.in_sum2", _sum2(v, tokens).reshape(1, -1))
                w.add_tensor(f"{g}.counts", np.full((1, 1), tokens, dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return p


def _sum2(v: np.ndarray, tokens: int) -> np.ndarray:
    """``in_sum2`` as stored: float32 of ``v * tokens`` (computed in float64)."""
    return (np.asarray(v, dtype=np.float64) * tokens).astype(np.float32)


def as_stored(imatrix: Imatrix, tokens: int) -> Imatrix:
    """The values :func:`load_imatrix_gguf` reads back from :func:`save_imatrix_gguf`
    (``in_sum2 / counts`` in float32), so that ``--imatrix auto`` and ``qexport imatrix`` +
    ``--imatrix FILE`` quantize identically."""
    n = np.float32(tokens)
    return {k: (_sum2(v, tokens) / n).astype(np.float32) for k, v in imatrix.items()}


def imatrix_sha256(imatrix: Imatrix) -> str:
    """sha256 over the sorted names and float32 bytes of ``imatrix`` (for provenance)."""
    h = hashlib.sha256()
    for k in sorted(imatrix):
        h.update(k.encode() + b"\0")
        h.update(np.ascontiguousarray(imatrix[k], dtype="<f4").tobytes())
    return h.hexdigest()


def resolve_imatrix(src: Any, source: str, *, calib: str | None, n_samples: int,
                    seq_len: int, seed: int, sampling: str = "random", progress: bool = True
                    ) -> tuple[Imatrix, dict[str, Any]]:
    """The importance matrix a run asked for: ``source`` = a llama-imatrix GGUF path, or
    ``"auto"`` = :func:`compute_imatrix` from ``calib`` (values as a saved file would hold them).

    Returns:
        (imatrix, provenance record ``{"source", "sha256", ...}``: the file's sha256 and its
        metadata, or the imatrix's own hash and the calibration info).
    """
    if source == "auto":
        if not calib:
            raise InputError("--imatrix auto computes the importance matrix from calibration "
                             "text: add --calib FILE (or pass --imatrix FILE.gguf)")
        im, info = compute_imatrix(src, calib, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                   sampling=sampling, progress=progress)
        im = as_stored(im, info["tokens"])
        return im, {"source": "auto", "sha256": imatrix_sha256(im), "entries": len(im),
                    "calibration": info}
    im, meta = load_imatrix_gguf(source)
    h = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return im, {"source": str(source), "file": Path(source).name, "sha256": h.hexdigest(),
                "values_sha256": imatrix_sha256(im), **meta}


def check_imatrix_plan(plan: dict[str, Any]) -> None:
    """UnsupportedError naming the first planned tensor that is not on a ``gguf-*`` spec: only
    llama.cpp's quantizers take an importance matrix."""
    for name, tp in plan.items():
        if not tp.spec.name.startswith("gguf-"):
            raise UnsupportedError(f"{name}: --imatrix expected a GGUF grid (llama.cpp's imatrix "
                                   f"quantizers; not {tp.spec.name}); use --to gguf, or --method "
                                   "gptq / leanquant with --calib for other targets")


def check_imatrix(imatrix: Imatrix, plan: dict[str, Any], src: Any, source: str) -> None:
    """Before any work: every planned decoder linear has an entry (llama-imatrix records all of
    them; a missing one means an imatrix of another model) of shape ``[in]``, finite and
    non-negative; every planned tensor is on a GGUF grid. Other planned tensors (embeddings,
    lm_head) use their entry when present, as llama-quantize does.

    Raises:
        UnsupportedError: a planned tensor not on a ``gguf-*`` spec.
        InputError: a missing entry or a wrong length; NumericsError: bad values.
    """
    check_imatrix_plan(plan)
    linears = set(src.linear_names())
    for name in plan:
        v = imatrix.get(name)
        if v is None:
            if name in linears:
                raise InputError(f"{name}: imatrix {source} has no entry for this tensor "
                                 f"(expected one per decoder linear; is it for another model?)")
            continue
        n_in = int(src.shape(name)[1])
        if v.shape != (n_in,):
            raise InputError(f"{name}: imatrix {source} entry expected shape [{n_in}] "
                             f"(not {list(v.shape)}; is it for another model?)")
        if not (np.isfinite(v).all() and (v >= 0).all()):
            raise NumericsError(f"{name}: imatrix {source} entry expected finite non-negative "
                                "values")


def quantize_rtn_imatrix(src: Any, plan: dict[str, Any], imatrix: Imatrix | None, *,
                         progress: bool = True,
                         on_tensor: Callable[[str, QTensor], None] | None = None) -> QModel:
    """``--method rtn`` onto GGUF grids with llama.cpp's imatrix quantizers: every tensor of
    ``plan`` (HF name -> :class:`qexport.specs.TensorPlan` on a ``gguf-*`` spec) is quantized
    by :func:`qexport.backends.gguf.llamacpp_quants.llamacpp_quantize` with ``imatrix[name]``
    (None where the imatrix has no entry, e.g. embeddings, as llama-quantize does).

    Raises:
        UnsupportedError: a plan entry that is not on a GGUF spec.
    """
    from tqdm import tqdm

    from qexport.backends.gguf.llamacpp_quants import llamacpp_quantize
    im = imatrix or {}
    tensors: dict[str, QTensor] = {}
    for name, tp in tqdm(plan.items(), desc="rtn+imatrix", disable=not progress, unit="tensor"):
        if not tp.spec.name.startswith("gguf-"):
            raise UnsupportedError(f"{name}: imatrix RTN expected a gguf-* spec "
                                   f"(not {tp.spec.name})")
        W = src.get(name)
        tp.spec.check_shape(W.shape, name)
        codes, grid = llamacpp_quantize(W, tp.spec.name[5:].upper(), im.get(name), name=name)
        qt = QTensor(name, codes, grid, tp.spec,
                     stats={"method": "llamacpp-rtn" + ("+imatrix" if name in im else "")})
        tensors[name] = qt
        if on_tensor is not None:
            on_tensor(name, qt)
    passthrough = {n: np.asarray(src.get(n), dtype=np.float32)
                   for n in src.tensor_names() if n not in tensors}
    prov = {"method": "rtn", "options": {"imatrix": bool(im)},
            "source": getattr(src, "source", "")}
    recipe = {"tensors": {n: p.to_dict() for n, p in plan.items()}}
    return QModel(config=dict(src.config), tensors=tensors, passthrough=passthrough,
                  tokenizer=dict(src.tokenizer), recipe=recipe, provenance=prov)
