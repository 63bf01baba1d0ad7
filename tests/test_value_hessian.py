"""v_proj's attention-weighted Hessian (``v_hessian="attention"``).

Oracle: transformers' eager attention (``output_attentions=True``) gives the probabilities
``A [B, heads, T, T]``; with ``w_t = mean_h sum_q A[q, t]^2`` normalised to mean 1 per sequence,
v_proj's Hessian must be ``2/N sum_t w_t x_t x_t^T`` of its input, while q/k (and every other
linear) keep the plain ``2/N sum_t x_t x_t^T``.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from qexport.calib import quantize_layerwise
from qexport.errors import InputError
from qexport.model import load_model
from qexport.model.forward import DecoderLayer, Rotary


def _oracle(path, samples):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    inputs = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0]))
             for name, mod in ref.named_modules() if name.endswith(("q_proj", "v_proj"))]
    with torch.no_grad():
        out = ref(samples, output_attentions=True)
    for h in hooks:
        h.remove()
    return inputs, out.attentions


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_value_hessian_matches_transformers_attention(fixture, request):
    path = request.getfixturevalue(fixture)
    src = load_model(path)
    samples = torch.randint(3, src.arch.vocab, (3, 20), generator=torch.Generator().manual_seed(1))
    seen = {}

    def qfn(name, W, H):
        seen[name] = H.double()
        return W                                   # keep the float model: oracle applies
    quantize_layerwise(src, samples, qfn, progress=False, batch_size=2, v_hessian="attention")
    inputs, attns = _oracle(path, samples)
    for i, A in enumerate(attns):
        w = A.double().square().sum(2).mean(1)                      # [B, T]
        w = w / w.mean(-1, keepdim=True)
        x = inputs[f"model.layers.{i}.self_attn.v_proj"].double()
        xw = (x * w.sqrt()[..., None]).reshape(-1, x.shape[-1])
        want_v = 2.0 / samples.shape[0] * xw.T @ xw
        flat = x.reshape(-1, x.shape[-1])
        plain = 2.0 / samples.shape[0] * flat.T @ flat
        p = f"model.layers.{i}.self_attn."
        torch.testing.assert_close(seen[p + "v_proj.weight"], want_v, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(seen[p + "q_proj.weight"], plain, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(seen[p + "k_proj.weight"], plain, atol=2e-4, rtol=2e-4)
        # the weighting is real: the first token (the sink) dominates more than in the plain H
        assert not torch.allclose(want_v, plain, rtol=1e-2)


@pytest.mark.parametrize("window", [None, 8])
def test_received_attention_chunking_and_sliding_window(tiny_mistral, window):
    src = load_model(tiny_mistral)
    a = dataclasses.replace(src.arch, sliding_window=window)
    layer = DecoderLayer(src.layer_weights(0), a, 0)
    h = torch.randn(2, 40, a.hidden, generator=torch.Generator().manual_seed(0))
    rope = Rotary(a)(40)
    x = layer.attn_input(h)
    got = layer.self_attn.received_attention(x, rope, q_chunk=7)
    torch.testing.assert_close(layer.self_attn.received_attention(x, rope, q_chunk=256), got,
                               atol=1e-6, rtol=1e-6)
    # independent oracle: explicit masked softmax of the rotated q.k scores
    at = layer.self_attn
    s = at.q_proj(x).view(2, 40, a.n_heads, a.head_dim).transpose(1, 2)
    k = at.k_proj(x).view(2, 40, a.n_kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = rope
    rot = lambda t: torch.cat((-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]), -1)
    s, k = s * cos + rot(s) * sin, k * cos + rot(k) * sin
    k = k.repeat_interleave(a.n_heads // a.n_kv_heads, 1)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    A = (s @ k.transpose(-1, -2) / a.head_dim ** 0.5).masked_fill(~allowed, -torch.inf).softmax(-1)
    torch.testing.assert_close(got, A.square().sum(2).mean(1), atol=1e-5, rtol=1e-5)
    assert torch.all(got.sum(-1) <= 40 + 1e-4) and torch.all(got >= 0)


def test_unknown_value_hessian_rejected(tiny_llama):
    src = load_model(tiny_llama)
    with pytest.raises(InputError, match=r"v_hessian: expected one of \['plain', 'attention'\]"):
        quantize_layerwise(src, torch.zeros(1, 4, dtype=torch.int64), lambda n, W, H: W,
                           progress=False, v_hessian="sink")
