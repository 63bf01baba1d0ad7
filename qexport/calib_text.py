"""Calibration text: tokenize a UTF-8 file and take seeded random (or tiled) token windows,
with a hash of the text and the sampling settings for provenance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import InputError
from qexport.model.tokenizer import bos_to_add, load_tokenizer

__all__ = ["load_calibration", "calibration_hash", "CALIB_SAMPLING"]

#: how calibration windows are drawn (see load_calibration)
CALIB_SAMPLING = ("random", "tiled")


def calibration_hash(text_sha256: str, settings: dict[str, Any]) -> str:
    """sha256 of the text's sha256 and the sampling settings (sorted JSON)."""
    blob = json.dumps({"text_sha256": text_sha256, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_text(path: str | Path) -> tuple[str, str]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: calibration text could not be read ({e.strerror})") from e
    try:
        return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: calibration text expected UTF-8 (byte {e.start} is not)") from e


def load_calibration(path: str | Path, tokenizer: Any, n_samples: int = 128, seq_len: int = 512,
                     seed: int = 0, sampling: str = "random"
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Tokenize the whole text once and take ``n_samples`` windows of ``seq_len`` tokens.

    ``sampling``: ``"random"`` = seeded random start positions (GPTQ's reference practice;
    windows may overlap); ``"tiled"`` = consecutive non-overlapping windows from the start of
    the text, the chunks ``llama-imatrix -c seq_len --chunks n_samples`` reads (``seed`` is
    unused; at most ``text_tokens // seq_len`` windows).

    ``tokenizer``: tokenizer files (dict name -> bytes), a folder, or a transformers tokenizer.
    If the tokenizer prepends BOS by default, each window's first token is replaced by BOS
    (llama.cpp's perplexity does the same), so calibration sees what evaluation sees.

    Returns:
        samples: int64 ``[n_samples, seq_len]``;
        info: ``{"file", "text_sha256", "text_tokens", "n_samples", "seq_len", "seed",
        "bos", "hash"}`` plus ``"sampling"`` when tiled (``hash`` = :func:`calibration_hash`,
        for provenance; random sampling keeps the hashes of earlier versions).
    """
    if sampling not in CALIB_SAMPLING:
        raise InputError(f"unknown calibration sampling {sampling!r}; expected one of "
                         f"{list(CALIB_SAMPLING)}")
    if n_samples <= 0 or seq_len <= 1:
        raise InputError(f"calibration expected n_samples >= 1 and seq_len >= 2 "
                         f"(not {n_samples}, {seq_len})")
    text, sha = _read_text(path)
    tok = load_tokenizer(tokenizer)
    ids = np.asarray(tok(text, add_special_tokens=False, verbose=False)["input_ids"],
                     dtype=np.int64)
    if ids.size < seq_len:
        raise InputError(f"{path}: calibration text has {ids.size} tokens; need at least "
                         f"{seq_len} (one window of seq_len)")
    if sampling == "tiled":
        if n_samples > ids.size // seq_len:
            raise InputError(f"{path}: tiled calibration expected at most "
                             f"{ids.size // seq_len} windows of {seq_len} tokens (the text has "
                             f"{ids.size} tokens), not {n_samples}; lower --n-samples or use "
                             f"random sampling")
        starts = np.arange(n_samples) * seq_len
    else:
        starts = np.random.default_rng(seed).integers(0, ids.size - seq_len + 1, size=n_samples)
    samples = torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]))
    bos = bos_to_add(tok)
    if bos is not None:
        samples[:, 0] = bos
    settings: dict[str, Any] = {"n_samples": n_samples, "seq_len": seq_len, "seed": seed,
                                "bos": bos is not None}
    if sampling != "random":
        settings["sampling"] = sampling
    info = {"file": Path(path).name, "text_sha256": sha, "text_tokens": int(ids.size),
            **settings, "hash": calibration_hash(sha, settings)}
    return samples, info
