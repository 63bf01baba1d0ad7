"""Atomic artifact output: build in a temporary sibling, rename when complete.

Every artifact (IR folder, .gguf file, ONNX folder, HF folder, adapter) is written through
:func:`atomic_output`, so an error, a full disk or an interrupt never leaves a partial artifact
at the requested path.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qexport.errors import InputError

__all__ = ["atomic_output", "check_output_path"]


def check_output_path(path: Path, force: bool) -> None:
    """Refuse an existing output unless ``force`` (exit 2, nothing written)."""
    if path.exists() and not force:
        raise InputError(f"{path}: output exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, is_dir: bool, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception (including KeyboardInterrupt) the temporary is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    check_output_path(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)        # mkdtemp makes 0700; the artifact gets normal modes
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        if path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        os.replace(target, path)
    except BaseException:
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
