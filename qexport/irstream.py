"""Streaming IR output and lazy IR tensors: memory bounded by one tensor, not by the model.

:class:`IRStreamWriter` takes finished QTensors and passthrough arrays one at a time, validates
each, writes its arrays to a staging folder (``.OUT.<random>.stream`` beside the output, one
small safetensors file per tensor, written by :data:`qexport.irio.save_file`) and keeps only the
manifest entry in memory. :meth:`IRStreamWriter.model` returns a :class:`QModel` whose
``tensors`` / ``passthrough`` are read-only mappings that read a tensor from disk on each access
(:class:`LazyTensors`, :class:`LazyPassthrough`); ``load_ir(path, lazy=True)`` gives the same
for an IR folder.

``save_ir`` of such a model (:func:`save_streamed`) writes the usual IR folder atomically, its
``tensors.safetensors`` assembled by copying each array's bytes (kernel-side) under a header
built exactly as ``safetensors.save_file`` builds it (:mod:`qexport.stfile`), so a streamed IR
is byte-identical to ``save_ir`` of the same values held in memory. After a save the model's
tensors are read from the new folder and the staging folder is removed; an unsaved staging
folder is removed by :meth:`IRStreamWriter.discard`, when the model is garbage-collected, or
at exit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qexport.atomic import atomic_output
from qexport.errors import IRError
from qexport.grids import GridSpec, grid_from_arrays
from qexport.ir import LowRank, QModel, QTensor
from qexport.stfile import Loc, copy_range, header_bytes, read_array, read_header

__all__ = ["IRStreamWriter", "StagedTensor", "LazyTensors", "LazyPassthrough", "FileArrays",
           "backing_of", "save_streamed", "lazy_model", "Relabelled", "tensor_meta", "is_lazy"]


class _Backing:
    """Manifest entries of an IR plus where each array lives; reads tensors on demand."""

    def __init__(self) -> None:
        self.specs: dict[str, GridSpec] = {}
        self.qmeta: dict[str, dict[str, Any]] = {}
        self.pmeta: dict[str, dict[str, Any]] = {}
        self.locs: dict[str, Loc] = {}
        self.stamps: dict[str, tuple[int, int, int]] = {}
        self.stage: Path | None = None
        self._cleanup: Any = None

    def stamp(self, path: str) -> None:
        st = os.stat(path)
        self.stamps[path] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def array(self, key: str) -> np.ndarray:
        loc = self.locs[key]
        _check_stamp(self, loc.path, key)
        return read_array(loc)

    def qtensor(self, name: str) -> QTensor:
        m = self.qmeta[name]
        spec = self.specs[m["spec"]]
        grid = grid_from_arrays(spec.kind, {k: self.array(f"q/{name}/{k}") for k in m["grid"]},
                                name)
        res = None
        if m["residual"] is not None:
            res = LowRank(self.array(f"q/{name}/lorc_a"), self.array(f"q/{name}/lorc_b"),
                          dtype=m["residual"]["dtype"])
        return QTensor(name, self.array(f"q/{name}/codes"), grid, spec, res,
                       dict(m["stats"] or {}))

    def keys_of(self, name: str) -> list[str]:
        if name in self.pmeta:
            return [f"p/{name}"]
        m = self.qmeta[name]
        return [f"q/{name}/{k}" for k in ["codes", *m["grid"]]] + \
            ([f"q/{name}/lorc_a", f"q/{name}/lorc_b"] if m["residual"] is not None else [])

    def rebind(self, tensors_file: Path, locs: dict[str, Loc]) -> None:
        """Read from ``tensors_file`` from now on and drop the staging folder."""
        self.locs = locs
        self.stamps = {}
        self.stamp(str(tensors_file))
        self.discard_stage()

    def discard_stage(self) -> None:
        if self._cleanup is not None:
            self._cleanup()                 # weakref.finalize: runs once
            self._cleanup = None
        self.stage = None


class _LazyMap(Mapping):
    """A read-only mapping over ``keys`` (a backing's metadata dict) whose values are loaded
    from disk by ``load(name)`` on each access."""

    def __init__(self, backing: _Backing, keys: Mapping[str, Any],
                 load: Callable[[str], Any]) -> None:
        self.backing, self._keys, self._load = backing, keys, load

    def __getitem__(self, name: str) -> Any:
        if name not in self._keys:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys


class LazyTensors(_LazyMap):
    """``QModel.tensors`` read from disk on each access (a new QTensor every time)."""

    def __init__(self, backing: _Backing) -> None:
        super().__init__(backing, backing.qmeta, backing.qtensor)

    def meta(self, name: str) -> tuple[GridSpec, tuple[int, ...], bool]:
        """``(spec, shape, has_residual)`` of ``name`` from the manifest, without reading it."""
        m = self.backing.qmeta[name]
        return self.backing.specs[m["spec"]], tuple(m["shape"]), m["residual"] is not None


class Relabelled(Mapping):
    """``tensors`` whose QTensors get new specs on access (``specs``: name -> GridSpec); the
    lazy counterpart of a dict of ``dataclasses.replace(qt, spec=...)``."""

    def __init__(self, inner: Mapping[str, QTensor], specs: dict[str, GridSpec]) -> None:
        self.inner, self.specs = inner, specs

    def __getitem__(self, name: str) -> QTensor:
        return dataclasses.replace(self.inner[name], spec=self.specs[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, name: object) -> bool:
        return name in self.inner

    def meta(self, name: str) -> tuple[GridSpec, tuple[int, ...], bool]:
        _, shape, res = tensor_meta(self.inner, name)
        return self.specs[name], shape, res


def tensor_meta(tensors: Mapping[str, QTensor], name: str) -> tuple[GridSpec, tuple[int, ...], bool]:
    """``(spec, shape, has_residual)`` of ``tensors[name]``, read from the manifest when
    ``tensors`` is lazy (no arrays loaded)."""
    if isinstance(tensors, (LazyTensors, Relabelled)):
        return tensors.meta(name)
    qt = tensors[name]
    return qt.spec, tuple(qt.shape), qt.residual is not None


def is_lazy(tensors: Mapping[str, Any]) -> bool:
    """Whether ``tensors`` reads from disk on access (so callers should not hold values)."""
    return isinstance(tensors, (LazyTensors, Relabelled))


class LazyPassthrough(_LazyMap):
    """``QModel.passthrough`` read from disk on each access (float32 arrays)."""

    def __init__(self, backing: _Backing) -> None:
        super().__init__(backing, backing.pmeta, lambda name: backing.array(f"p/{name}"))


def backing_of(model: QModel) -> _Backing | None:
    """The disk backing of a model from :class:`IRStreamWriter` / ``load_ir(lazy=True)``."""
    t, p = model.tensors, model.passthrough
    if isinstance(t, LazyTensors) and isinstance(p, LazyPassthrough) and t.backing is p.backing:
        return t.backing
    return None


def _model_from(backing: _Backing, **fields: Any) -> QModel:
    return QModel(tensors=LazyTensors(backing), passthrough=LazyPassthrough(backing),  # type: ignore[arg-type]
                  **fields)


@dataclass(frozen=True)
class StagedTensor:
    """Stand-in for a QTensor already written by an :class:`IRStreamWriter`."""

    name: str
    writer: "IRStreamWriter"

    def load(self) -> QTensor:
        return self.writer.backing.qtensor(self.name)


class IRStreamWriter:
    """Write QTensors and passthrough arrays as they are produced (see module docstring).

    Args:
        out: the artifact being built; the staging folder is created beside it, on first use.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.backing = _Backing()
        self._n = 0

    def _stage(self) -> Path:
        b = self.backing
        if b.stage is None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            b.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".stream",
                                            dir=self.out.parent))
            b._cleanup = weakref.finalize(b, shutil.rmtree, str(b.stage), True)
        return b.stage

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        from qexport import irio        # through irio.save_file: one writer for all IR bytes
        f = self._stage() / f"{self._n:06d}.safetensors"
        self._n += 1
        irio.save_file(arrays, str(f), metadata={"format": irio.FORMAT})
        locs = read_header(f)
        if set(locs) != set(arrays):
            raise IRError(f"{f}: staged arrays {sorted(locs)} differ from {sorted(arrays)}")
        self.backing.locs.update(locs)
        self.backing.stamp(str(f))

    def _check_new(self, name: str) -> None:
        if name in self.backing.qmeta or name in self.backing.pmeta:
            raise IRError(f"{name}: written twice to the IR")

    def add(self, qt: QTensor) -> StagedTensor:
        """Validate ``qt``, write it, and return a small stand-in (``.load()`` reads it back)."""
        from qexport.irio import add_spec, tensor_entry
        self._check_new(qt.name)
        qt.validate()
        specs = {k: v.to_dict() for k, v in self.backing.specs.items()}
        add_spec(specs, qt.name, qt.spec)
        meta, arrays = tensor_entry(qt)
        self._write(arrays)
        self.backing.specs.setdefault(qt.spec.name, qt.spec)
        self.backing.qmeta[qt.name] = json.loads(json.dumps(meta))
        return StagedTensor(qt.name, self)

    def add_passthrough(self, name: str, arr: np.ndarray) -> None:
        """Write float32 passthrough tensor ``name``."""
        from qexport.irio import passthrough_entry
        self._check_new(name)
        arr = np.asarray(arr)
        if arr.dtype != np.float32:
            raise IRError(f"{name}: passthrough expected float32 (not {arr.dtype})")
        meta, arrays = passthrough_entry(name, arr)
        self._write(arrays)
        self.backing.pmeta[name] = meta

    def finish_model(self, src: Any, tensors: dict[str, Any], **fields: Any) -> QModel:
        """End of a quantize run: write the QTensors of ``tensors`` not written yet (a resume
        without a sink-aware checkpoint), then every other tensor of ``src`` as float32
        passthrough, one at a time; return :meth:`model`."""
        for name, qt in tensors.items():
            if isinstance(qt, QTensor):
                self.add(qt)
        for name in src.tensor_names():
            if name not in tensors:
                self.add_passthrough(name, np.asarray(src.get(name), dtype=np.float32))
        return self.model(**fields)

    def model(self, **fields: Any) -> QModel:
        """A QModel over everything written so far (``config``, ``tokenizer``, ``recipe``,
        ``provenance`` as for :class:`QModel`)."""
        return _model_from(self.backing, **fields)

    def discard(self) -> None:
        """Remove the staging folder (after a failure)."""
        self.backing.discard_stage()


def save_streamed(model: QModel, backing: _Backing, path: Path, *, force: bool) -> Path:
    """``save_ir`` for a disk-backed model: manifest from the entries, tensors file assembled
    from the staged bytes, atomically; afterwards the model reads from ``path``."""
    from qexport.irio import FORMAT, manifest_dict, manifest_text, write_tokenizer
    clash = set(backing.qmeta) & set(backing.pmeta)
    if clash:
        raise IRError(f"{sorted(clash)[0]}: present both as quantized and passthrough")
    specs = {k: backing.specs[k].to_dict() for k in
             sorted({m["spec"] for m in backing.qmeta.values()})}
    man = manifest_dict(model, specs, {n: backing.qmeta[n] for n in sorted(backing.qmeta)},
                        {n: backing.pmeta[n] for n in sorted(backing.pmeta)})
    keys = [k for n in [*backing.qmeta, *backing.pmeta] for k in backing.keys_of(n)]
    entries = {k: (backing.locs[k].dtype, backing.locs[k].shape, backing.locs[k].nbytes)
               for k in keys}
    head, order = header_bytes(entries, {"format": FORMAT})
    with atomic_output(path, is_dir=True, force=force) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "manifest.json").write_text(manifest_text(man))
        with open(tmp / "tensors.safetensors", "wb") as f:
            f.write(head)
            f.flush()
            for k in order:
                loc = backing.locs[k]
                _check_stamp(backing, loc.path, k)
                copy_range(loc.path, loc.offset, loc.nbytes, f)
        write_tokenizer(tmp, model.tokenizer)
    final = path / "tensors.safetensors"
    backing.rebind(final, read_header(final))
    return path


def _check_stamp(backing: _Backing, path: str, key: str) -> None:
    st = os.stat(path) if os.path.exists(path) else None
    if st is None or backing.stamps.get(path) != (st.st_ino, st.st_size, st.st_mtime_ns):
        raise IRError(f"{path}: changed or removed since the IR was loaded or written "
                      f"(reading {key})")


class FileArrays:
    """A dict-like view of a safetensors file for ``load_ir(lazy=True)``'s validation pass:
    ``key in``, ``pop(key)`` (reads that array), ``len`` / iteration over keys not yet popped."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="numpy"):
                pass                          # the library's own checks of header and sizes
        except (SafetensorError, OSError, ValueError) as e:
            raise IRError(f"{path}: cannot read safetensors ({e})") from e
        self.locs = read_header(path)
        self._left = set(self.locs)
        self.path = path

    def __contains__(self, key: object) -> bool:
        return key in self._left

    def pop(self, key: str) -> np.ndarray:
        self._left.remove(key)
        return read_array(self.locs[key])

    def __len__(self) -> int:
        return len(self._left)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._left))


def lazy_model(path: Path, arrays: FileArrays, specs: dict[str, GridSpec],
               man: dict[str, Any], **fields: Any) -> QModel:
    """A QModel over a validated IR folder whose tensors are read on access (entries in the
    form ``save_ir`` writes them, so that saving it again gives the same manifest)."""
    b = _Backing()
    b.specs = dict(specs)
    for n, m in man["tensors"].items():
        r = m.get("residual")
        b.qmeta[n] = {"shape": list(m["shape"]), "spec": m["spec"], "grid": sorted(m["grid"]),
                      "residual": None if r is None else {"rank": r["rank"], "dtype": r["dtype"]},
                      "stats": dict(m.get("stats") or {})}
    b.pmeta = {n: {"shape": list(m["shape"]), "dtype": "fp32"}
               for n, m in man["passthrough"].items()}
    b.locs = arrays.locs
    b.stamp(str(arrays.path))
    return _model_from(b, **fields)
