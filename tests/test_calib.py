"""Calibration windows and the layer-by-layer Hessian driver.

Oracle for the driver: transformers' model carrying the weights the driver finally installed,
with forward hooks on every nn.Linear. In GPTQ's true-sequential scheme each group's input is
computed with all earlier groups already quantized and does not depend on the group's own
weights, so every Hessian handed to quantize_fn must equal ``2/N * sum x x^T`` of that linear's
input in the fully quantized model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.calib import HessianAccumulator, load_calibration, quantize_layerwise
from qexport.errors import InputError, NumericsError
from qexport.model import linear_names, load_model


def test_windows_seeded_and_bos(tiny_llama, c4_text):
    src = load_model(tiny_llama)
    a, info = load_calibration(c4_text, src.tokenizer, n_samples=6, seq_len=32, seed=0)
    b, info_b = load_calibration(c4_text, src.tokenizer, n_samples=6, seq_len=32, seed=0)
    c, info_c = load_calibration(c4_text, src.tokenizer, n_samples=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and info == info_b
    assert not torch.equal(a, c) and info_c["hash"] != info["hash"]
    assert info["bos"] and (a[:, 0] == 1).all()          # fixture tokenizer adds BOS
    assert info["text_tokens"] > 1000 and len(info["text_sha256"]) == 64
    # the windows are real consecutive tokens of the text
    from qexport.model import load_tokenizer
    ids = load_tokenizer(src.tokenizer)(c4_text.read_text(), add_special_tokens=False)["input_ids"]
    s = " ".join(map(str, ids))
    assert " ".join(map(str, a[2, 1:].tolist())) in s


class ByteTokenizer:
    """Stand-in tokenizer (bytes + 3), optionally prepending BOS=1 like add_bos_token does."""

    bos_token_id = 1

    def __init__(self, add_bos: bool) -> None:
        self.add_bos = add_bos

    def encode(self, text):
        return self(text)["input_ids"]

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [b + 3 for b in text.encode()]
        return {"input_ids": ([1] if add_special_tokens and self.add_bos else []) + ids}


@pytest.mark.parametrize("add_bos", [False, True])
def test_bos_policy_follows_tokenizer(tmp_path, add_bos):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 20)
    x, info = load_calibration(text, ByteTokenizer(add_bos), n_samples=4, seq_len=16, seed=0)
    assert info["bos"] == add_bos
    assert (x[:, 0] == 1).all() == add_bos
    assert torch.all(x[:, 1:] >= 3)
    starts = np.random.default_rng(0).integers(0, 200 - 16 + 1, size=4)
    expect = np.stack([np.frombuffer(text.read_bytes()[s:s + 16], np.uint8) + 3 for s in starts])
    assert np.array_equal(x[:, 1:].numpy(), expect[:, 1:])


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiled_windows_are_consecutive_chunks(tmp_path, add_bos):
    """tiled: window k = tokens [k*T, (k+1)*T) (llama-imatrix's chunk k), BOS replacing the
    first token as with random windows; the seed does not matter; the hash names the sampling
    while random sampling keeps the hash of earlier versions (no "sampling" key)."""
    from qexport.calib import calibration_hash
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(32 + i % 95) for i in range(200)))   # 200 bytes -> 200 tokens
    x, info = load_calibration(text, ByteTokenizer(add_bos), n_samples=12, seq_len=16,
                               sampling="tiled")
    y, info_y = load_calibration(text, ByteTokenizer(add_bos), n_samples=12, seq_len=16,
                                 seed=7, sampling="tiled")
    ids = np.frombuffer(text.read_bytes(), np.uint8).astype(np.int64) + 3
    assert np.array_equal(x[:, 1:].numpy(), ids[:192].reshape(12, 16)[:, 1:])
    assert (x[:, 0] == 1).all() == add_bos
    assert torch.equal(x, y) and info["sampling"] == "tiled"
    r, info_r = load_calibration(text, ByteTokenizer(add_bos), n_samples=12, seq_len=16)
    assert "sampling" not in info_r and info_r["hash"] != info["hash"]
    assert info_r["hash"] == calibration_hash(info_r["text_sha256"], {
        "n_samples": 12, "seq_len": 16, "seed": 0, "bos": add_bos})
    with pytest.raises(InputError, match=r"at most 12 windows of 16 tokens \(the text has 200 "
                                         r"tokens\), not 13"):
        load_calibration(text, ByteTokenizer(add_bos), n_samples=13, seq_len=16,
                         sampling="tiled")
    with pytest.raises(InputError, match=r"unknown calibration sampling 'strided'; expected "
                                         r"one of \['random', 'tiled'\]"):
        load_calibration(text, ByteTokenizer(add_bos), n_samples=2, seq_len=16,
                         sampling="strided")


def test_too_short_text(tmp_path, tiny_llama):
    src = load_model(tiny_llama)
    short = tmp_path / "short.txt"
    short.write_text("def f(x): return x")
    with pytest.raises(InputError, match=r"has \d+ tokens; need at least 512"):
        load_calibration(short, src.tokenizer, n_samples=2, seq_len=512)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="has 0 tokens"):
        load_calibration(empty, src.tokenizer)


def test_hessian_accumulator_equals_direct(rng):
    x = torch.from_numpy(rng.normal(size=(7, 5, 6)).astype(np.float32))
    acc = HessianAccumulator(6)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 7)):
        acc.add(x[sl])
    flat = x.reshape(-1, 6).double()
    direct = 2.0 / 7 * flat.T @ flat
    torch.testing.assert_close(acc.H.double(), direct, atol=1e-5, rtol=1e-5)
    assert acc.n == 7


def _oracle_hessians(path, weights: dict[str, torch.Tensor], samples: torch.Tensor):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    sd = ref.state_dict()
    with torch.no_grad():
        for n, w in weights.items():
            sd[n].copy_(w)
    hess, hooks = {}, []
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(m, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                hess[name + ".weight"] = 2.0 / samples.shape[0] * x.T @ x
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        ref(samples)
    return hess


@pytest.mark.parametrize("fixture,perturb", [("tiny_qwen2", False), ("stories260k", True)])
def test_driver_hessians_match_quantized_model(fixture, perturb, request):
    path = request.getfixturevalue(fixture)
    src = load_model(path)
    gen = torch.Generator().manual_seed(0)
    samples = torch.randint(3, src.arch.vocab, (5, 24), generator=gen)
    seen, installed, done = [], {}, []

    def qfn(name, W, H):
        seen.append((name, H.clone()))
        W.mul_(0)                       # the driver must hand out copies
        new = src.get(name) * (0.8 if perturb else 1.0)
        new = np.round(new * 64) / 64 if perturb else new
        installed[name] = torch.from_numpy(new.astype(np.float32))
        return new if perturb else installed[name]

    stats = quantize_layerwise(src, samples, qfn, progress=False, batch_size=2,
                               on_layer_done=done.append)
    order = [n for i in range(src.arch.n_layers) for g in linear_names(i) for n in g]
    assert [n for n, _ in seen] == order
    assert done == list(range(src.arch.n_layers)) and stats["layers"] == src.arch.n_layers
    oracle = _oracle_hessians(path, installed, samples)
    for name, H in seen:
        torch.testing.assert_close(H.double(), oracle[name], atol=2e-4, rtol=2e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_driver_cache_and_recompute_agree(tiny_llama):
    src = load_model(tiny_llama)
    samples = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(2))

    def run(cache_bytes):
        out = {}

        def qfn(name, W, H):
            out[name] = H
            return W * 0.9
        quantize_layerwise(src, samples, qfn, progress=False, batch_size=3,
                           cache_bytes=cache_bytes)
        return out

    a, b = run(1 << 30), run(0)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-6)


def test_driver_rejects_bad_quantize_fn(tiny_llama):
    src = load_model(tiny_llama)
    samples = torch.randint(0, 1000, (2, 8))
    with pytest.raises(InputError, match=r"q_proj.weight: quantize_fn returned shape \[3\]"):
        quantize_layerwise(src, samples, lambda n, W, H: torch.zeros(3), progress=False)
    with pytest.raises(NumericsError, match="q_proj.weight.*NaN"):
        quantize_layerwise(src, samples, lambda n, W, H: W * float("nan"), progress=False)
    with pytest.raises(InputError, match="token ids in"):
        quantize_layerwise(src, samples + 5000, lambda n, W, H: W, progress=False)


def test_driver_reports_overflowing_activations(tiny_llama):
    src = load_model(tiny_llama)
    samples = torch.randint(0, 1000, (2, 8))

    def qfn(name, W, H):
        return W * 1e30 if name.endswith("0.mlp.gate_proj.weight") else W
    with pytest.raises(NumericsError, match=r"layers\.0\.mlp\.down_proj\.weight: Hessian has NaN"):
        quantize_layerwise(src, samples, qfn, progress=False)
