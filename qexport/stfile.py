"""Byte-level safetensors helpers for streamed IR output (see :mod:`qexport.irstream`).

``safetensors.save_file`` needs every array in memory at once; these helpers let the IR writer
build the same file from arrays already on disk:

| rule            | value                                                                 |
|-----------------|-----------------------------------------------------------------------|
| file            | u64 little-endian header length, header, data                         |
| header          | compact JSON, padded with spaces to a multiple of 8 bytes             |
| JSON key order  | ``__metadata__`` first, then tensors in data order                    |
| data order      | dtype descending in :data:`ST_DTYPES` order (the library's Dtype enum), |
|                 | then name (byte order)                                                |
| tensor entry    | ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to data  |

tests/test_memory_stream.py checks :func:`header_bytes` against the library byte for byte.
Reads use plain file reads (``np.fromfile``), never a memory map, so nothing read stays
resident in the process.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import IRError

__all__ = ["ST_DTYPES", "Loc", "read_header", "read_array", "header_bytes", "copy_range",
           "OffsetWriter"]

#: numpy dtype -> safetensors dtype name, in the library's Dtype enum order (data is laid out
#: in *descending* order of this list, then by name)
ST_DTYPES: dict[str, str] = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16",
                             "uint16": "U16", "float16": "F16", "int32": "I32",
                             "uint32": "U32", "float32": "F32", "float64": "F64",
                             "int64": "I64", "uint64": "U64"}
_NP_OF = {v: np.dtype(k) for k, v in ST_DTYPES.items()}
#: the library's Dtype enum order (ST_DTYPES plus dtypes numpy lacks); data order descends it
_RANK = {v: i for i, v in enumerate(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16",
                                     "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}
_COPY_CHUNK = 1 << 26
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class Loc:
    """Where one array's bytes are: file, absolute offset, dtype name, shape."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _NP_OF[self.dtype].itemsize


def read_header(path: Path) -> dict[str, Loc]:
    """Array locations of a safetensors file, every size checked against the file's length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise IRError(f"{path}: safetensors header length {n} does not fit a {size}-byte "
                          "file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IRError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise IRError(f"{path}: safetensors header expected an object")
    locs, start = {}, 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in info["data_offsets"])
            loc = Loc(str(path), start + b, str(info["dtype"]),
                      tuple(int(d) for d in info["shape"]))
        except (TypeError, KeyError, ValueError) as ex:
            raise IRError(f"{path}: {key}: malformed header entry ({ex})") from ex
        if loc.dtype not in _NP_OF or min(loc.shape, default=0) < 0 \
                or not 0 <= b <= e <= size - start or e - b != loc.nbytes:
            raise IRError(f"{path}: {key}: expected {loc.dtype} {list(loc.shape)} inside the "
                          f"file (not bytes [{b}, {e}) of {size - start})")
        locs[key] = loc
    return locs


def read_array(loc: Loc) -> np.ndarray:
    """The array at ``loc`` (a fresh, writable copy read with plain file reads, no mmap)."""
    dt = _NP_OF[loc.dtype]
    count = loc.nbytes // dt.itemsize
    arr = np.fromfile(loc.path, dtype=dt, count=count, offset=loc.offset) if count \
        else np.zeros(0, dtype=dt)
    if arr.size != count:
        raise IRError(f"{loc.path}: expected {count} values at byte {loc.offset} "
                      f"(found {arr.size}; file truncated?)")
    return arr.reshape(loc.shape)


def header_bytes(entries: dict[str, tuple[str, tuple[int, ...], int]],
                 metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """Header of a safetensors file holding ``entries`` (key -> (dtype, shape, nbytes)), as
    ``safetensors.save_file`` writes it; returns ``(header with length prefix, data order)``."""
    order = sorted(entries, key=lambda k: (-_RANK[entries[k][0]], k.encode()))
    head: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for k in order:
        dtype, shape, nbytes = entries[k]
        head[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def copy_range(src: str, offset: int, n: int, dst: Any) -> None:
    """Copy ``n`` bytes at ``offset`` of file ``src`` to the end of open file ``dst`` (kernel-
    side ``copy_file_range`` where the file systems allow it, else 1 MiB reads and writes)."""
    dst.flush()
    with open(src, "rb") as f:
        done = 0
        try:
            while done < n:
                k = os.copy_file_range(f.fileno(), dst.fileno(), min(n - done, _COPY_CHUNK),
                                       offset + done)
                if k == 0:
                    raise IRError(f"{src}: ended before byte {offset + n} (file truncated?)")
                done += k
            return
        except (AttributeError, OSError) as e:        # no copy_file_range here: plain copy
            if isinstance(e, OSError) and e.errno not in _NO_COPY_RANGE:
                raise
        f.seek(offset + done)
        dst.seek(0, os.SEEK_END)
        while done < n:
            buf = f.read(min(n - done, 1 << 20))
            if not buf:
                raise IRError(f"{src}: ended before byte {offset + n} (file truncated?)")
            dst.write(buf)
            done += len(buf)
        dst.flush()


class OffsetWriter:
    """A safetensors file whose entries are known up front: the header is written first and
    each tensor's bytes go straight to its offset (``os.pwrite``) whenever it arrives, in any
    order, so a writer holds one tensor at a time. The result equals ``save_file`` of the same
    tensors (same header, same data order).

    Args:
        path: the file to create (the caller makes it atomic).
        entries: key -> (safetensors dtype name, shape, nbytes).
        metadata: the header's ``__metadata__``.
    """

    def __init__(self, path: str | os.PathLike, entries: dict[str, tuple[str, tuple[int, ...], int]],
                 metadata: dict[str, str] | None) -> None:
        head, order = header_bytes(entries, metadata)
        self.entries, self.offsets, pos = entries, {}, len(head)
        for k in order:
            self.offsets[k] = pos
            pos += entries[k][2]
        self.size, self.left = pos, set(entries)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(head, 0)

    def _pwrite(self, data: memoryview | bytes, pos: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def write(self, key: str, data: np.ndarray) -> None:
        """Write ``key``'s bytes (any array whose raw bytes are the tensor's, e.g. a uint8 view)."""
        if key not in self.entries:
            raise IRError(f"{key}: not in the planned safetensors header")
        if key not in self.left:
            raise IRError(f"{key}: written twice")
        raw = np.ascontiguousarray(data)
        if raw.nbytes != self.entries[key][2]:
            raise IRError(f"{key}: expected {self.entries[key][2]} bytes (not {raw.nbytes})")
        self._pwrite(raw.reshape(-1).view(np.uint8).data, self.offsets[key])
        self.left.discard(key)

    def close(self) -> None:
        """Close; raises IRError naming a planned tensor that was never written."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            if self.left:
                raise IRError(f"{sorted(self.left)[0]}: planned but never written "
                              f"({len(self.left)} tensors missing)")

    def __enter__(self) -> "OffsetWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
