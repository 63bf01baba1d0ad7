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


# GGUF value type -> fixed byte size (STRING=8 and ARRAY=9 are variable)
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 4


class _Cursor:
    """Bounds-checked little/big-endian reads of a GGUF header (nothing is allocated from a
    size read out of the file before that size is checked against the bytes left)."""

    def __init__(self, f: Any, size: int, path: Path, endian: str) -> None:
        self.f, self.size, self.path, self.e = f, size, path, endian
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InputError(f"{self.path}: {what} needs {n} bytes at offset {self.pos} but the "
                             f"file has {self.size} bytes: truncated or corrupt GGUF")

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.f.seek(self.pos)
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def u(self, fmt: str, what: str) -> int:
        st = struct.Struct(self.e + fmt)
        return int(st.unpack(self.raw(st.size, what))[0])

    def string(self, what: str) -> bytes:
        return self.raw(self.u("Q", f"{what} length"), what)

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _VALUE_SIZES:
            self.skip(_VALUE_SIZES[vtype], what)
        elif vtype == 8:
            self.skip(self.u("Q", f"{what} length"), what)
        elif vtype == 9 and depth == 0:
            itype, count = self.u("I", f"{what} item type"), self.u("Q", f"{what} count")
            if itype in _VALUE_SIZES:
                self.skip(count * _VALUE_SIZES[itype], f"{what} ({count} items)")
            elif itype in (8, 9):
                self.need(count * 8, f"{what} ({count} items)")    # each item >= 8 bytes
                for _ in range(count):
                    self.value(itype, what, depth + 1)
            else:
                raise InputError(f"{self.path}: {what}: unknown array item type {itype}")
        else:
            raise InputError(f"{self.path}: {what}: unknown GGUF value type {vtype}")


def _check_header(path: Path) -> None:
    """Walk the whole header (metadata and tensor infos) with every count, length, dimension,
    type and data range checked against the file, before gguf-py touches it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise InputError(f"{path}: not a GGUF file (only {len(head)} bytes, expected a "
                             f"{_HEADER.size}-byte header)")
        if head[:4] != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
        endian = "<" if struct.unpack("<I", head[4:8])[0] & 0xFFFF else ">"
        c = _Cursor(f, size, path, endian)
        c.pos = 4
        version = c.u("I", "version")
        if version not in (2, 3):
            raise InputError(f"{path}: GGUF version {version} not supported (expected 2 or 3)")
        n_t, n_kv = c.u("Q", "tensor count"), c.u("Q", "metadata count")
        # every tensor info takes >= 8+4+8+4+8 bytes and every kv >= 8+4+1
        if n_t * 32 + n_kv * 13 > size:
            raise InputError(f"{path}: corrupt GGUF header ({n_t} tensors, {n_kv} keys do not "
                             f"fit in {size} bytes)")
        alignment = _scan_kv(c, n_kv)
        _scan_tensors(c, n_t, alignment)


def _scan_kv(c: _Cursor, n_kv: int) -> int:
    """Check every metadata entry; returns ``general.alignment`` (default 32)."""
    keys: set[bytes] = set()
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        if key in keys:
            raise InputError(f"{c.path}: duplicate metadata key {key.decode(errors='replace')}")
        keys.add(key)
        vtype = c.u("I", f"type of {key!r}")
        if key == b"general.alignment":
            if vtype != 4:
                raise InputError(f"{c.path}: general.alignment expected uint32 (type {vtype})")
            alignment = c.u("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise InputError(f"{c.path}: general.alignment {alignment} is not a power of 2")
            continue
        c.value(vtype, f"metadata {key.decode(errors='replace')}")
    return alignment


def _scan_tensors(c: _Cursor, n_t: int, alignment: int) -> None:
    """Check names (unique), dims, types and that each tensor's data lies inside the file."""
    infos = []
    names: set[bytes] = set()
    for i in range(n_t):
        name = c.string(f"tensor {i} name")
        label = name.decode(errors="replace")
        if name in names:
            raise InputError(f"{c.path}: duplicate tensor name {label}")
        names.add(name)
        n_dims = c.u("I", f"{label} n_dims")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise InputError(f"{c.path}: tensor {label} has {n_dims} dimensions (expected 1.."
                             f"{_MAX_DIMS})")
        dims = [c.u("Q", f"{label} dim") for _ in range(n_dims)]
        ttype = c.u("I", f"{label} type")
        offset = c.u("Q", f"{label} offset")
        infos.append((label, dims, ttype, offset))
    data_start = c.pos + (-c.pos) % alignment
    for label, dims, ttype, offset in infos:
        try:
            block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise InputError(f"{c.path}: tensor {label} has unknown ggml type {ttype}") from None
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block:
            raise InputError(f"{c.path}: tensor {label}: row of {dims[0]} values is not a "
                             f"multiple of the type's block of {block}")
        end = data_start + offset + n // block * tsize
        if end > c.size:
            raise InputError(f"{c.path}: tensor {label} data [{data_start + offset}, {end}) "
                             f"lies past the end of the file ({c.size} bytes): truncated or "
                             "corrupt GGUF")


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
