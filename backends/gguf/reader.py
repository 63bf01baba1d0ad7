"""Read a ``.gguf`` file safely: a per-tensor summary and its metadata (``qexport inspect``).

Every malformed input (missing file, wrong magic, unknown version, truncated header or data,
tensor data past the end of the file) raises InputError with one line naming the file.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf import GGUFValueType

from qexport.errors import InputError

from .vocab import kv_json

__all__ = ["TensorRow", "open_gguf", "read_gguf_summary", "read_gguf_metadata",
           "read_gguf_tokenizer"]

_HEADER = struct.Struct("<IIQQ")          # magic, version, n_tensors, n_kv
_MAX_ARRAY_SHOWN = 8


class TensorRow(NamedTuple):
    """One tensor of a GGUF file.

    Attributes:
        name: GGUF tensor name (``blk.0.attn_q.weight``).
        type: ggml type name (``Q4_K``, ``F32``).
        shape: numpy order (ggml ``ne`` reversed), e.g. ``(out, in)``.
        bytes: stored bytes (without alignment padding).
        bpw: bits per weight, ``8 * bytes / elements``.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    bytes: int
    bpw: float


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise InputError(f"{path}: not a GGUF file (only {len(head)} bytes, expected a "
                         f"{_HEADER.size}-byte header)")
    magic, version, n_t, n_kv = _HEADER.unpack(head)
    if magic != gguf.GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if version not in (2, 3):
        raise InputError(f"{path}: GGUF version {version} not supported (expected 2 or 3)")
    # every tensor info takes >= 8+4+8+4+8 bytes and every kv >= 8+4+1, so counts are bounded
    if n_t * 32 + n_kv * 13 > size:
        raise InputError(f"{path}: corrupt GGUF header ({n_t} tensors, {n_kv} keys do not fit "
                         f"in {size} bytes)")


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A ``gguf.GGUFReader`` of ``path``, with every tensor's data checked to lie inside the
    file; InputError (one line) for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    _check_header(path)
    try:
        r = gguf.GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, MemoryError,
            UnicodeDecodeError, OSError) as e:
        raise InputError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    size = path.stat().st_size
    for t in r.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise InputError(f"{path}: tensor {t.name} data [{t.data_offset}, {end}) lies past "
                             f"the end of the file ({size} bytes): truncated GGUF")
    return r


def read_gguf_metadata(r: gguf.GGUFReader, *, full: bool = False) -> dict[str, Any]:
    """Metadata as Python values; arrays longer than 8 are summarised unless ``full``."""
    meta: dict[str, Any] = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        vt = GGUFValueType(int(f.types[0]))
        if vt == GGUFValueType.ARRAY and not full and len(f.data) > _MAX_ARRAY_SHOWN:
            it = GGUFValueType(int(f.types[1])).name if len(f.types) > 1 else "?"
            meta[key] = f"[{len(f.data)} x {it}]"
            continue
        try:
            meta[key] = f.contents()
        except (UnicodeDecodeError, ValueError, IndexError):
            meta[key] = f"<undecodable {vt.name}>"
    return meta


def read_gguf_summary(path: str | os.PathLike) -> tuple[list[TensorRow], dict[str, Any]]:
    """Per-tensor rows (file order) and the metadata of a GGUF file (see TensorRow)."""
    r = open_gguf(path)
    rows = []
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        n = int(np.prod(shape)) if shape else 1
        rows.append(TensorRow(name=t.name, type=t.tensor_type.name, shape=shape,
                              bytes=int(t.n_bytes), bpw=8.0 * int(t.n_bytes) / max(n, 1)))
    return rows, read_gguf_metadata(r)


def read_gguf_tokenizer(path: str | os.PathLike) -> bytes:
    """The ``gguf_tokenizer.json`` bytes (raw ``tokenizer.*`` keys, see :mod:`.vocab`) of a
    GGUF file, for an IR built from a GGUF input; lower_gguf writes them back verbatim."""
    r = open_gguf(path)
    doc = kv_json(r.fields)
    if not doc["keys"]:
        raise InputError(f"{path}: GGUF has no tokenizer.* metadata")
    return json.dumps(doc, ensure_ascii=True).encode("utf-8")
