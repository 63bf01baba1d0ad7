"""The IR folder format (``*.qir``): a strict, versioned manifest plus safetensors.

| file                   | content                                                        |
|------------------------|----------------------------------------------------------------|
| ``manifest.json``      | format, ir_version, config, specs, tensors, passthrough, recipe, provenance |
| ``tensors.safetensors``| ``q/<name>/codes`` uint8 [out, in]; ``q/<name>/<grid array>``; ``q/<name>/lorc_a`` / ``lorc_b``; ``p/<name>`` float32 passthrough |
| ``tokenizer/``         | tokenizer files carried from the source model                  |

Unknown keys, missing arrays, extra arrays and shapes that disagree with the manifest are
rejected with an error naming the tensor and field. Never pickle.

Bounded memory: ``qexport quantize`` streams each finished tensor to disk as it is produced and
``save_ir`` then assembles the same bytes without loading them; ``load_ir(path, lazy=True)``
reads tensors on access (:mod:`qexport.irstream`). The folder format is the same either way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from qexport.atomic import atomic_output
from qexport.errors import IRError
from qexport.grids import GridError, GridSpec, grid_from_arrays
from qexport.ir import IR_VERSION, LowRank, QModel, QTensor

FORMAT = "qexport-ir"
_TOP_KEYS = {"format", "ir_version", "config", "specs", "tensors", "passthrough", "recipe",
             "provenance", "tokenizer_files"}
_TENSOR_KEYS = {"shape", "spec", "grid", "residual", "stats"}
__all__ = ["save_ir", "load_ir", "FORMAT", "tensor_entry", "passthrough_entry"]


def tensor_entry(qt: QTensor) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest entry of one QTensor and its arrays (keys ``q/<name>/...``)."""
    name = qt.name
    arrays = {f"q/{name}/codes": np.ascontiguousarray(qt.codes)}
    for k, v in qt.grid.arrays().items():
        arrays[f"q/{name}/{k}"] = np.ascontiguousarray(v)
    res = None
    if qt.residual is not None:
        res = {"rank": qt.residual.rank, "dtype": qt.residual.dtype}
        arrays[f"q/{name}/lorc_a"] = np.ascontiguousarray(qt.residual.A, dtype=np.float32)
        arrays[f"q/{name}/lorc_b"] = np.ascontiguousarray(qt.residual.B, dtype=np.float32)
    meta = {"shape": list(qt.shape), "spec": qt.spec.name, "grid": sorted(qt.grid.arrays()),
            "residual": res, "stats": qt.stats}
    return meta, arrays


def passthrough_entry(name: str, arr: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest entry of one passthrough tensor and its float32 array (key ``p/<name>``)."""
    return ({"shape": list(arr.shape), "dtype": "fp32"},
            {f"p/{name}": np.ascontiguousarray(arr, dtype=np.float32)})


def add_spec(specs: dict[str, Any], name: str, spec: GridSpec) -> None:
    """Record ``spec`` under its name; IRError when another spec already has that name."""
    prev = specs.setdefault(spec.name, spec.to_dict())
    if prev != spec.to_dict():
        raise IRError(f"{name}: two different specs are both named {spec.name!r}")


def manifest_dict(model: QModel, specs: dict[str, Any], tensors: dict[str, Any],
                  passthrough: dict[str, Any]) -> dict[str, Any]:
    """The whole ``manifest.json`` object (the model's own fields + the given entries)."""
    return {"format": FORMAT, "ir_version": model.ir_version, "config": model.config,
            "specs": specs, "tensors": tensors, "passthrough": passthrough,
            "recipe": model.recipe, "provenance": model.provenance,
            "tokenizer_files": sorted(model.tokenizer)}


def manifest_text(man: dict[str, Any]) -> str:
    return json.dumps(man, indent=1, sort_keys=True) + "\n"


def write_tokenizer(folder: Path, tokenizer: dict[str, bytes]) -> None:
    if tokenizer:
        (folder / "tokenizer").mkdir()
        for fname, data in sorted(tokenizer.items()):
            (folder / "tokenizer" / fname).write_bytes(data)


def _manifest(model: QModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    specs: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(model.tensors):
        qt = model.tensors[name]
        add_spec(specs, name, qt.spec)
        tensors[name], arr = tensor_entry(qt)
        arrays.update(arr)
    passthrough = {}
    for name in sorted(model.passthrough):
        passthrough[name], arr = passthrough_entry(name, model.passthrough[name])
        arrays.update(arr)
    return manifest_dict(model, specs, tensors, passthrough), arrays


def save_ir(model: QModel, path: str | os.PathLike, force: bool = False) -> Path:
    """Validate ``model`` and write it as an IR folder at ``path`` (atomically).

    A model whose tensors live on disk (from :class:`qexport.irstream.IRStreamWriter` or
    ``load_ir(..., lazy=True)``) is written without loading its tensors: the file is assembled
    from the staged bytes, identical to what an in-memory model with the same values gives.
    """
    from qexport.irstream import backing_of, save_streamed
    backing = backing_of(model)
    if backing is not None:
        return save_streamed(model, backing, Path(path), force=force)
    model.validate()
    man, arrays = _manifest(model)
    with atomic_output(path, is_dir=True, force=force) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "manifest.json").write_text(manifest_text(man))
        save_file(arrays, str(tmp / "tensors.safetensors"), metadata={"format": FORMAT})
        write_tokenizer(tmp, model.tokenizer)
    return Path(path)


def _need(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in d:
        raise IRError(f"{where}: missing key {key!r}")
    if not isinstance(d[key], typ):
        raise IRError(f"{where}.{key}: expected {typ.__name__} (not {type(d[key]).__name__})")
    return d[key]


def _read_manifest(path: Path) -> dict[str, Any]:
    mf = path / "manifest.json"
    if not mf.is_file():
        raise IRError(f"{path}: not an IR folder (no manifest.json)")
    try:
        man = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IRError(f"{mf}: not valid JSON ({e})") from e
    if not isinstance(man, dict):
        raise IRError(f"{mf}: expected a JSON object (not {type(man).__name__})")
    unknown = set(man) - _TOP_KEYS
    if unknown:
        raise IRError(f"{mf}: unknown keys {sorted(unknown)}")
    if man.get("format") != FORMAT:
        raise IRError(f"{mf}: format expected {FORMAT!r} (not {man.get('format')!r})")
    if man.get("ir_version") != IR_VERSION:
        raise IRError(f"{mf}: ir_version expected {IR_VERSION} (not {man.get('ir_version')!r})")
    return man


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    tf = path / "tensors.safetensors"
    try:
        return load_file(str(tf))
    except (SafetensorError, OSError, ValueError) as e:
        raise IRError(f"{tf}: cannot read safetensors ({e})") from e


def _take(arrays: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    if key not in arrays:
        raise IRError(f"{where}: array {key!r} missing from tensors.safetensors")
    return arrays.pop(key)


def _load_tensor(name: str, meta: Any, specs: dict[str, GridSpec],
                 arrays: dict[str, np.ndarray]) -> QTensor:
    if not isinstance(meta, dict):
        raise IRError(f"{name}: tensor entry expected an object")
    unknown = set(meta) - _TENSOR_KEYS
    if unknown:
        raise IRError(f"{name}: unknown keys {sorted(unknown)}")
    spec_name = _need(meta, "spec", str, name)
    if spec_name not in specs:
        raise IRError(f"{name}.spec: {spec_name!r} not among the manifest's specs "
                      f"{sorted(specs)}")
    spec = specs[spec_name]
    shape = tuple(_need(meta, "shape", list, name))
    codes = _take(arrays, f"q/{name}/codes", name)
    if codes.shape != shape:
        raise IRError(f"{name}.codes: expected shape {list(shape)} (not {list(codes.shape)})")
    grid_names = _need(meta, "grid", list, name)
    try:
        grid = grid_from_arrays(spec.kind, {k: _take(arrays, f"q/{name}/{k}", name)
                                            for k in grid_names}, name)
    except GridError as e:
        raise IRError(str(e)) from e
    res = None
    if meta.get("residual") is not None:
        r = meta["residual"]
        res = LowRank(_take(arrays, f"q/{name}/lorc_a", name),
                      _take(arrays, f"q/{name}/lorc_b", name), dtype=_need(r, "dtype", str, name))
        if res.rank != _need(r, "rank", int, name):
            raise IRError(f"{name}.residual.rank: expected {r['rank']} (found {res.rank})")
    qt = QTensor(name, codes, grid, spec, res, dict(meta.get("stats") or {}))
    qt.validate()
    return qt


def load_ir(path: str | os.PathLike, *, lazy: bool = False) -> QModel:
    """Read and fully validate an IR folder (IRError, one line, for anything malformed).

    ``lazy``: validate every tensor one at a time, then return a model whose ``tensors`` and
    ``passthrough`` read each tensor from the folder on access (memory: one tensor), see
    :mod:`qexport.irstream`. Default: everything in memory.
    """
    path = Path(path)
    try:
        return _load_ir(path, lazy)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
        # a manifest value of the wrong JSON type somewhere the checks above do not look
        raise IRError(f"{path}: malformed IR ({type(e).__name__}: {e})") from e


def _load_ir(path: Path, lazy: bool = False) -> QModel:
    man = _read_manifest(path)
    try:
        specs = {k: GridSpec.from_dict(v, f"specs.{k}") for k, v in
                 _need(man, "specs", dict, "manifest").items()}
    except (GridError, TypeError) as e:
        raise IRError(f"{path}/manifest.json: {e}") from e
    for k, spec in specs.items():
        if spec.name != k:
            raise IRError(f"{path}/manifest.json: specs.{k}.name expected {k!r} "
                          f"(not {spec.name!r})")
    if lazy:
        from qexport.irstream import FileArrays
        arrays: Any = FileArrays(path / "tensors.safetensors")
    else:
        arrays = _load_arrays(path)
    tensors = {}
    for n, m in _need(man, "tensors", dict, "manifest").items():
        qt = _load_tensor(n, m, specs, arrays)
        if not lazy:
            tensors[n] = qt
    passthrough = {}
    for n, m in _need(man, "passthrough", dict, "manifest").items():
        arr = _take(arrays, f"p/{n}", n)
        if not isinstance(m, dict) or list(arr.shape) != m.get("shape"):
            raise IRError(f"{n}: passthrough shape expected {m.get('shape') if isinstance(m, dict) else m} "
                          f"(found {list(arr.shape)})")
        if arr.dtype != np.float32:
            raise IRError(f"{n}: passthrough expected float32 (not {arr.dtype})")
        if not lazy:
            passthrough[n] = arr
    if arrays:
        raise IRError(f"{path}/tensors.safetensors: arrays not in the manifest: "
                      f"{sorted(arrays)[:5]}")
    tok = {}
    for fname in _need(man, "tokenizer_files", list, "manifest"):
        fp = path / "tokenizer" / str(fname)
        if "/" in str(fname) or not fp.is_file():
            raise IRError(f"{path}: tokenizer file {fname!r} listed but missing")
        tok[str(fname)] = fp.read_bytes()
    fields = dict(config=_need(man, "config", dict, "manifest"), tokenizer=tok,
                  recipe=_need(man, "recipe", dict, "manifest"),
                  provenance=_need(man, "provenance", dict, "manifest"),
                  ir_version=man["ir_version"])
    if lazy:
        from qexport.irstream import lazy_model
        clash = set(man["tensors"]) & set(man["passthrough"])
        if clash:
            raise IRError(f"{sorted(clash)[0]}: present both as quantized and passthrough")
        return lazy_model(path, arrays, specs, man, **fields)
    model = QModel(tensors=tensors, passthrough=passthrough, **fields)
    model.validate()
    return model
