"""Per-layer checkpoints of a quantize run, so that an interrupted run can be resumed.

A run that writes ``OUT`` (an IR folder or an exported artifact) keeps ``OUT.partial/`` beside it
while it works; ``--resume`` continues from the last finished decoder layer and produces the same
bytes as an uninterrupted run. The folder is removed once ``OUT`` is complete.

| file                        | content                                                      |
|-----------------------------|--------------------------------------------------------------|
| ``manifest.json``           | format, version, the run's ``settings`` and their sha256,    |
|                             | ``layers_done`` (layers 0..k-1 finished), ``hidden`` file     |
| ``layer_0000.safetensors``  | finished QTensors of layer i: ``q/<name>/codes``, grid arrays, |
|                             | ``lorc_a``/``lorc_b``; metadata ``tensors`` = JSON of spec,    |
|                             | grid names, residual dtype and stats per tensor               |
| ``hidden_0001.safetensors`` | ``h`` float32 ``[N, T, hidden]``: the residual stream entering |
|                             | layer ``layers_done`` (output of the quantized layers before) |

Every file is written to a temporary name and renamed; the manifest is replaced last, so an
interrupt at any point leaves a consistent checkpoint. Resuming with different settings (options,
calibration text, source model files, per-tensor plan) is refused with the differences named.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qexport.errors import InputError
from qexport.grids import GridError, GridSpec, grid_from_arrays
from qexport.ir import LowRank, QTensor

__all__ = ["Checkpoint", "partial_dir", "run_settings", "settings_diff", "FORMAT"]

#: options that do not change a run's result (a resume may differ in them)
_NOT_OUTPUT = ("progress", "calib", "offload_activations")

FORMAT = "qexport-checkpoint"
VERSION = 1
_MANIFEST = "manifest.json"


def partial_dir(out: str | os.PathLike) -> Path:
    """``OUT.partial`` beside ``OUT``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _fingerprint(source: str) -> dict[str, Any]:
    """Name, size and mtime of the source model's files (cheap; no hashing of weights)."""
    p = Path(source)
    if source.startswith("sample:"):
        from qexport.model.load import sample_path
        p = sample_path(source.split(":", 1)[1])
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) + [p / "config.json"]
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}


def run_settings(src: Any, plan: dict[str, Any], opts: Any,
                 calib_info: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines a run's output: options (minus the calibration file's path,
    progress and activation offloading), calibration hash, source files, and each tensor's GridSpec."""
    options = {k: v for k, v in asdict(opts).items() if k not in _NOT_OUTPUT}
    source = str(getattr(src, "source", ""))
    settings = {"options": options, "calibration": calib_info.get("hash"),
                "source": {"path": os.path.abspath(source) if Path(source).exists() else source,
                           "files": _fingerprint(source)},
                "plan": {n: p.spec.to_dict() for n, p in sorted(plan.items())}}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["options.seed: 0 -> 1", ...]`` for every setting that differs (sorted)."""
    fo, fn = _flatten(old), _flatten(new)
    return [f"{k}: {fo.get(k, '(absent)')} -> {fn.get(k, '(absent)')}"
            for k in sorted(set(fo) | set(fn)) if fo.get(k, None) != fn.get(k, None)
            or (k in fo) != (k in fn)]


def _hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _qtensor_entry(qt: QTensor, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    arrays[f"q/{qt.name}/codes"] = np.ascontiguousarray(qt.codes)
    for k, v in qt.grid.arrays().items():
        arrays[f"q/{qt.name}/{k}"] = np.ascontiguousarray(v)
    res = None
    if qt.residual is not None:
        res = {"dtype": qt.residual.dtype}
        arrays[f"q/{qt.name}/lorc_a"] = np.ascontiguousarray(qt.residual.A)
        arrays[f"q/{qt.name}/lorc_b"] = np.ascontiguousarray(qt.residual.B)
    return {"spec": qt.spec.to_dict(), "grid": sorted(qt.grid.arrays()), "residual": res,
            "stats": qt.stats}


def _qtensor_from(name: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> QTensor:
    spec = GridSpec.from_dict(meta["spec"], f"{name}.spec")
    grid = grid_from_arrays(spec.kind, {k: arrays[f"q/{name}/{k}"] for k in meta["grid"]}, name)
    res = None
    if meta["residual"] is not None:
        res = LowRank(arrays[f"q/{name}/lorc_a"], arrays[f"q/{name}/lorc_b"],
                      dtype=meta["residual"]["dtype"])
    qt = QTensor(name, arrays[f"q/{name}/codes"], grid, spec, res, dict(meta["stats"]))
    qt.validate()
    return qt


class Checkpoint:
    """The ``OUT.partial/`` folder of one run (see module docstring).

    Use: ``ck = Checkpoint(out, resume=...)``; the pipeline calls :meth:`begin` with the run's
    settings (-> first layer to run, hidden states, restored QTensors), :meth:`save_layer` after
    every decoder layer, and the caller :meth:`finish` once ``OUT`` is written.
    """

    def __init__(self, out: str | os.PathLike, *, resume: bool = False) -> None:
        self.out = Path(out)
        self.dir = partial_dir(out)
        self.resume = resume
        self.resumed_from = 0            # layers restored by begin() (0: fresh run)
        self.active = False              # begin() succeeded: the folder is this run's
        self._settings_hash = ""
        self.sink: Any = None            # an IRStreamWriter: restored layers go straight to it

    def _read_manifest(self) -> dict[str, Any]:
        try:
            man = json.loads((self.dir / _MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.dir}: unreadable checkpoint manifest ({e}); delete the "
                             "folder to start over") from e
        if not isinstance(man, dict) or man.get("format") != FORMAT \
                or man.get("version") != VERSION:
            raise InputError(f"{self.dir}: not a qexport checkpoint (format {FORMAT!r} "
                             f"version {VERSION} expected); delete the folder to start over")
        return man

    def begin(self, settings: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
        """Start or resume. Returns ``(first_layer, hidden or None, restored QTensors)``; with
        :attr:`sink` set, the restored QTensors are written to it and stand-ins returned.

        Raises InputError when resuming with different settings (naming each difference) or
        when a checkpoint exists and ``resume`` is off.
        """
        h = _hash(settings)
        self._settings_hash = h
        if self.dir.exists() and (self.dir / _MANIFEST).is_file():
            man = self._read_manifest()
            if not self.resume:
                raise InputError(f"{self.dir}: an interrupted run left {man.get('layers_done')}"
                                 " finished layers here; pass --resume to continue it, or "
                                 "delete the folder to start over")
            if man.get("settings_hash") != h:
                diff = settings_diff(man.get("settings", {}), settings)
                more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
                raise InputError(f"{self.dir}: cannot resume, settings differ from the "
                                 f"interrupted run: {'; '.join(diff[:3])}{more}")
            restored = self._restore(man)
            self.active = True
            return restored
        if self.dir.exists():                    # a run interrupted before its first layer
            foreign = [f.name for f in self.dir.iterdir() if not f.name.startswith(
                ("layer_", "hidden_", "."))] if self.dir.is_dir() else []
            if foreign or not self.dir.is_dir():
                raise InputError(f"{self.dir}: exists and is not a qexport checkpoint "
                                 f"({foreign[:1] or 'not a folder'}); move it away")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._write_manifest(settings, 0, None)
        self._settings = settings
        self.active = True
        return 0, None, {}

    def _restore(self, man: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        self._settings = man["settings"]
        k = int(man["layers_done"])
        tensors: dict[str, Any] = {}
        for i in range(k):                       # one layer in memory at a time
            for name, qt in self._read_layer(i).items():
                tensors[name] = qt if self.sink is None else self.sink.add(qt)
        hidden = None
        try:
            if man.get("hidden"):
                import torch
                hidden = torch.from_numpy(load_file(str(self.dir / man["hidden"]))["h"])
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise InputError(f"{self.dir}: damaged checkpoint ({type(e).__name__}: {e}); "
                             "delete the folder to start over") from e
        self.resumed_from = k
        return k, hidden, tensors

    def _read_layer(self, i: int) -> dict[str, QTensor]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file, safe_open
        f = self.dir / f"layer_{i:04d}.safetensors"
        try:
            with safe_open(str(f), framework="numpy") as so:
                meta = json.loads((so.metadata() or {})["tensors"])
            arrays = load_file(str(f))
            return {name: _qtensor_from(name, m, arrays) for name, m in meta.items()}
        except (OSError, KeyError, ValueError, SafetensorError, GridError) as e:
            raise InputError(f"{self.dir}: damaged checkpoint ({type(e).__name__}: {e}); "
                             "delete the folder to start over") from e

    def _write_manifest(self, settings: dict[str, Any], done: int, hidden: str | None) -> None:
        man = {"format": FORMAT, "version": VERSION, "settings_hash": self._settings_hash,
               "layers_done": done, "hidden": hidden, "settings": settings}
        _replace_atomic(self.dir / _MANIFEST,
                        lambda p: p.write_text(json.dumps(man, indent=1, sort_keys=True)))

    def save_layer(self, i: int, tensors: dict[str, Any], hidden: Any) -> None:
        """Record layer ``i`` finished: its QTensors (or :class:`qexport.irstream.StagedTensor`
        stand-ins, read back one layer at a time) and the hidden states entering ``i + 1``
        (torch float32 ``[N, T, hidden]``)."""
        from safetensors.numpy import save_file
        arrays: dict[str, np.ndarray] = {}
        meta = {n: _qtensor_entry(qt if isinstance(qt, QTensor) else qt.load(), arrays)
                for n, qt in sorted(tensors.items())}
        _replace_atomic(self.dir / f"layer_{i:04d}.safetensors", lambda p: save_file(
            arrays, str(p), metadata={"tensors": json.dumps(meta, sort_keys=True)}))
        hname = f"hidden_{i + 1:04d}.safetensors"
        h = hidden.detach().contiguous().numpy()
        _replace_atomic(self.dir / hname, lambda p: save_file({"h": h}, str(p)))
        self._write_manifest(self._settings, i + 1, hname)
        old = self.dir / f"hidden_{i:04d}.safetensors"
        if old.exists():
            old.unlink()

    def layers_done(self) -> int:
        """Finished layers recorded in the folder (0 when there is none)."""
        if not (self.dir / _MANIFEST).is_file():
            return 0
        try:
            return int(self._read_manifest().get("layers_done") or 0)
        except (InputError, TypeError, ValueError):
            return 0

    def discard_if_empty(self) -> int:
        """After a failed run: remove the folder unless it holds finished layers; returns
        the number of finished layers kept."""
        self._discard_sink()
        if not self.active:
            return 0
        done = self.layers_done()
        if done == 0:
            self.finish()
        return done

    def _discard_sink(self) -> None:
        if self.sink is not None:
            self.sink.discard()

    def finish(self) -> None:
        """Remove the checkpoint folder (after ``OUT`` is complete, or when the run failed in
        a way a resume would repeat); a folder this run did not begin is left alone. Also
        removes the staging folder of :attr:`sink` (the run's streamed IR) if still there."""
        self._discard_sink()
        if self.active:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.active = False
