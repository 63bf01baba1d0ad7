"""Perplexity with one protocol everywhere (docs: DESIGN.md §7, models-data.md §4.4).

The token stream (whole file tokenized once, no special tokens) is cut into consecutive
non-overlapping windows of ``ctx`` tokens; each window is evaluated on its own (positions
0..ctx-1, no carried state). If the tokenizer prepends BOS by default, the window's first token
is replaced by BOS (as llama.cpp's perplexity does); otherwise nothing is inserted. Scored:

=============== ===================================== =========================
metric          targets of each window (0-based)      per window at ctx=512
=============== ===================================== =========================
``all_targets`` 1 .. ctx-1                            511
``second_half`` ctx/2 .. ctx-1                        256
``llama_cpp``   ctx/2+1 .. ctx-1                      255
=============== ===================================== =========================

PPL = exp(sum NLL / number of scored tokens). ``all_targets`` is the GPTQ-paper figure,
``second_half`` the project's "llama-perplexity -c 512 style" reference figure (models-data.md
§4.4: 29.47 / 23.61 for the sample model), and ``llama_cpp`` exactly what llama.cpp's
``perplexity`` tool scores (``first = n_ctx/2``, ``n_ctx - 1 - first`` targets per chunk), for
comparing with the number it prints.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qexport.errors import InputError
from qexport.model.tokenizer import bos_to_add, load_tokenizer

__all__ = ["WIKITEXT2_TEST_SHA256", "EvalText", "load_eval_text", "perplexity", "window_nll"]

WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
LogitsFn = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class EvalText:
    """A tokenized evaluation text: ``ids`` int64 ``[n_tokens]``, the BOS id to put at each
    window start (None: insert nothing), the file's sha256 and path."""

    ids: np.ndarray
    bos_id: int | None
    sha256: str
    path: str


def load_eval_text(path: str | Path, tokenizer: Any) -> EvalText:
    """Read and tokenize an evaluation text (whole file, ``add_special_tokens=False``).

    A file named ``wiki.test.raw`` is checked against the canonical wikitext-2 sha256 and a
    warning is issued if it differs (several public copies with that name are fakes).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: evaluation text could not be read ({e.strerror})") from e
    sha = hashlib.sha256(raw).hexdigest()
    if p.name == "wiki.test.raw" and sha != WIKITEXT2_TEST_SHA256:
        warnings.warn(f"{p}: sha256 {sha[:12]}... is not the canonical wikitext-2 test file "
                      f"({WIKITEXT2_TEST_SHA256[:12]}...); perplexities will not be comparable",
                      stacklevel=2)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: evaluation text expected UTF-8 (byte {e.start} is not)") from e
    tok = load_tokenizer(tokenizer)
    ids = np.asarray(tok(text, add_special_tokens=False, verbose=False)["input_ids"],
                     dtype=np.int64)
    return EvalText(ids=ids, bos_id=bos_to_add(tok), sha256=sha, path=str(p))


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """NLL of each target: ``logits`` ``[T, V]`` and ``window`` int ``[T]`` -> float64
    ``[T-1]`` where entry ``t-1`` is ``-log p(window[t] | window[:t])``."""
    logp = torch.log_softmax(logits[:-1].to(torch.float32), dim=-1)
    return -logp.gather(1, window[1:, None].long())[:, 0].to(torch.float64)


def _as_logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise InputError(f"logits function expected to return [B, T, V] logits (not "
                         f"{getattr(out, 'shape', type(out).__name__)})")
    return out


def perplexity(model_or_logits_fn: LogitsFn, token_ids: Any, ctx: int = 512,
               n_windows: int | None = None, progress: bool = True, *,
               bos_id: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Perplexity of ``token_ids`` (1-D ints, or an :class:`EvalText` whose BOS policy is used)
    under ``model_or_logits_fn``: any callable mapping int64 ``[B, ctx]`` to logits
    ``[B, ctx, V]`` (torch or numpy; a qexport CausalLM, or an ONNX / llama.cpp wrapper).

    Returns:
        ``{"all_targets", "second_half", "llama_cpp", "n_windows", "tokens_scored",
        "tokens_scored_second_half", "tokens_scored_llama_cpp", "ctx", "bos"}`` (see the
        module docstring for which targets each metric scores).
    """
    if isinstance(token_ids, EvalText):
        bos_id = token_ids.bos_id if bos_id is None else bos_id
        token_ids = token_ids.ids
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    if ctx < 4 or ctx % 2:
        raise InputError(f"perplexity context expected an even number >= 4 (not {ctx})")
    avail = ids.numel() // ctx
    n = avail if n_windows is None else min(n_windows, avail)
    if n <= 0:
        raise InputError(f"perplexity needs at least one window of {ctx} tokens "
                         f"(text has {ids.numel()}; n_windows={n_windows})")
    windows = ids[:n * ctx].view(n, ctx).clone()
    if bos_id is not None:
        windows[:, 0] = bos_id
    from tqdm import tqdm
    half = ctx // 2
    nll_all = nll_half = nll_lcpp = 0.0
    done = 0
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            batch = windows[s:s + batch_size]
            logits = _as_logits(model_or_logits_fn(batch))
            for row in range(batch.shape[0]):
                nll = window_nll(logits[row], batch[row])
                nll_all += float(nll.sum())
                nll_half += float(nll[half - 1:].sum())
                nll_lcpp += float(nll[half:].sum())
            done += batch.shape[0]
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll_all / (done * (ctx - 1))):.3f}")
    bar.close()
    n_all, n_half, n_lcpp = n * (ctx - 1), n * (ctx - half), n * (ctx - half - 1)
    return {"all_targets": math.exp(nll_all / n_all), "second_half": math.exp(nll_half / n_half),
            "llama_cpp": math.exp(nll_lcpp / n_lcpp), "n_windows": n, "tokens_scored": n_all,
            "tokens_scored_second_half": n_half, "tokens_scored_llama_cpp": n_lcpp, "ctx": ctx,
            "bos": bos_id is not None}
