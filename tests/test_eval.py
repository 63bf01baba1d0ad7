"""Perplexity protocol: windows, BOS policy, scored targets; oracle = transformers logits +
torch cross_entropy computed directly."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qexport.errors import InputError
from qexport.eval import WIKITEXT2_TEST_SHA256, EvalText, load_eval_text, perplexity


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def _direct(model, ids: np.ndarray, ctx: int, n: int, bos: int | None,
            lcpp: bool = False) -> tuple[float, float]:
    nll_all, nll_half = [], []
    for k in range(n):
        w = torch.as_tensor(ids[k * ctx:(k + 1) * ctx]).clone()
        if bos is not None:
            w[0] = bos
        with torch.no_grad():
            logits = model(w[None]).logits[0].double()
        ce = F.cross_entropy(logits[:-1], w[1:], reduction="none")
        nll_all.append(ce)
        # targets ctx/2 .. ctx-1 (llama.cpp: logits first..ctx-2 predict targets first+1..)
        nll_half.append(ce[ctx // 2:] if lcpp else ce[ctx // 2 - 1:])
    return (math.exp(torch.cat(nll_all).mean().item()),
            math.exp(torch.cat(nll_half).mean().item()))


@pytest.mark.parametrize("bos", [None, 1])
def test_perplexity_equals_direct(hf_model, bos):
    ids = np.random.default_rng(0).integers(3, 1000, size=5 * 64 + 17)
    res = perplexity(lambda x: hf_model(x).logits, ids, ctx=64, progress=False, bos_id=bos,
                     batch_size=2)
    want_all, want_half = _direct(hf_model, ids, 64, 5, bos)
    assert res["n_windows"] == 5 and res["tokens_scored"] == 5 * 63
    assert res["tokens_scored_second_half"] == 5 * 32 and res["bos"] == (bos is not None)
    assert res["all_targets"] == pytest.approx(want_all, rel=1e-5)
    assert res["second_half"] == pytest.approx(want_half, rel=1e-5)
    assert res["all_targets"] != pytest.approx(res["second_half"], rel=1e-3)
    _, want_lcpp = _direct(hf_model, ids, 64, 5, bos, lcpp=True)
    assert res["tokens_scored_llama_cpp"] == 5 * 31
    assert res["llama_cpp"] == pytest.approx(want_lcpp, rel=1e-5)
    assert res["llama_cpp"] != pytest.approx(res["second_half"], rel=1e-4)


def test_our_forward_and_window_limit(tiny_llama, hf_model):
    from qexport.model import build_causal_lm, load_model
    src = load_model(tiny_llama)
    lm = build_causal_lm(src.config, src.state_dict())
    ids = np.random.default_rng(1).integers(3, 1000, size=4 * 32)
    ours = perplexity(lm, ids, ctx=32, n_windows=3, progress=False)
    theirs = perplexity(hf_model, ids, ctx=32, n_windows=3, progress=False)   # .logits output
    assert ours["n_windows"] == 3
    assert ours["all_targets"] == pytest.approx(theirs["all_targets"], rel=1e-5)
    numpy_fn = perplexity(lambda x: lm(x).numpy(), ids, ctx=32, n_windows=3, progress=False)
    assert numpy_fn["all_targets"] == pytest.approx(ours["all_targets"], rel=1e-9)


def test_eval_text_bos_policy_is_used(tmp_path, tiny_llama, hf_model):
    from qexport.model import load_model
    p = tmp_path / "text.txt"
    p.write_text("import os\nfor i in range(10):\n    print(i, os.sep)\n" * 40)
    text = load_eval_text(p, load_model(tiny_llama).tokenizer)
    assert isinstance(text, EvalText) and text.bos_id == 1 and text.ids[0] != 1
    res = perplexity(hf_model, text, ctx=32, progress=False)
    want, _ = _direct(hf_model, text.ids, 32, text.ids.size // 32, 1)
    assert res["bos"] and res["all_targets"] == pytest.approx(want, rel=1e-5)


def test_too_few_tokens(hf_model):
    with pytest.raises(InputError, match="at least one window of 64 tokens"):
        perplexity(hf_model, np.arange(10), ctx=64, progress=False)
    with pytest.raises(InputError, match="even number"):
        perplexity(hf_model, np.arange(100), ctx=33, progress=False)


def test_wikitext_name_checks_hash(tmp_path, tiny_llama):
    from qexport.model import load_model
    tok = load_model(tiny_llama).tokenizer
    fake = tmp_path / "wiki.test.raw"
    fake.write_text(" = Fake = \n\n The quick brown fox .\n")
    with pytest.warns(UserWarning, match="not the canonical wikitext-2"):
        load_eval_text(fake, tok)
    other = tmp_path / "other.txt"
    other.write_text(" = Fake = \n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_eval_text(other, tok)


def test_canonical_wikitext_hash(data_dir):
    import hashlib
    p = data_dir / "wikitext-2-raw" / "wiki.test.raw"
    if not p.is_file():
        pytest.skip(f"{p} absent")
    assert hashlib.sha256(p.read_bytes()).hexdigest() == WIKITEXT2_TEST_SHA256
