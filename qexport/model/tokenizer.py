"""Tokenizer helpers: build a transformers tokenizer from a model's tokenizer files and find out
whether it prepends BOS (which decides the BOS policy of calibration and perplexity)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from qexport.errors import InputError

__all__ = ["load_tokenizer", "bos_to_add"]


def load_tokenizer(tok: Any) -> Any:
    """A transformers tokenizer from ``tok``: a dict file name -> bytes (SourceModel.tokenizer,
    QModel.tokenizer), a folder path, or an already built tokenizer (returned as is)."""
    if isinstance(tok, (str, os.PathLike)):
        files = {f.name: f.read_bytes() for f in Path(tok).iterdir() if f.is_file()}
    elif isinstance(tok, dict):
        files = tok
    elif callable(getattr(tok, "encode", None)):
        return tok
    else:
        raise InputError(f"expected tokenizer files or a tokenizer (not {type(tok).__name__})")
    if not any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise InputError("the model has no tokenizer (expected tokenizer.json, tokenizer.model "
                         f"or vocab.json; found {sorted(files) or 'none'})")
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="qexport-tok-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as e:
            raise InputError(f"tokenizer files could not be loaded "
                             f"({type(e).__name__}: {e})") from e


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one by default (``add_bos_token``), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(plain) and with_special[0] == bos
    return int(bos) if adds else None
