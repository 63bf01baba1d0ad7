"""qexport's own forward against transformers (fp32, eager attention) as the oracle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qexport.errors import InputError
from qexport.model import build_causal_lm, load_model
from qexport.model.forward import DecoderLayer


def _reference(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def _compare(path: Path, seq: int = 48, atol: float = 1e-4) -> None:
    src = load_model(path)
    ours = build_causal_lm(src.config, src.state_dict())
    ids = torch.randint(0, src.arch.vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids), _reference(path)(ids).logits
    assert got.shape == want.shape == (2, seq, src.arch.vocab)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("fixture", ["stories260k", "tiny_llama", "tiny_qwen2", "tiny_mistral"])
def test_logits_match_transformers(fixture, request):
    _compare(request.getfixturevalue(fixture))


def _variant(tmp_path: Path, base: Path, **changes) -> Path:
    d = tmp_path / "variant"
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_llama3_rope_scaling_matches(tmp_path, tiny_llama):
    # small original context so that low, medium and high frequencies all occur at head_dim 64
    l3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    d = _variant(tmp_path, tiny_llama, rope_parameters=l3)
    assert load_model(d).arch.rope_type == "llama3"
    _compare(d, seq=80)


def test_mistral_sliding_window_matches(tmp_path, tiny_mistral):
    d = _variant(tmp_path, tiny_mistral, sliding_window=8)
    _compare(d, seq=40)


def test_staged_layer_equals_forward(tiny_qwen2):
    src = load_model(tiny_qwen2)
    lm = build_causal_lm(src.config, src.state_dict())
    layer = DecoderLayer(src.layer_weights(1), src.arch, 1)
    h = torch.randn(2, 16, src.arch.hidden)
    rope = lm.rotary(16)
    mid = layer.attn_residual(h, layer.attn_context(h, rope))
    staged = layer.mlp_residual(mid, layer.mlp_hidden(mid))
    torch.testing.assert_close(staged, layer(h, rope), atol=0, rtol=0)
    torch.testing.assert_close(layer(h, rope), lm.layers[1](h, rope), atol=0, rtol=0)
    assert layer.linear("model.layers.1.mlp.up_proj.weight") is layer.mlp.up_proj
    assert layer.linear("self_attn.q_proj").bias is not None


def test_build_causal_lm_is_strict(tiny_llama):
    src = load_model(tiny_llama)
    sd = src.state_dict()
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(InputError, match="missing tensor model.norm.weight"):
        build_causal_lm(src.config, missing)
    with pytest.raises(InputError, match="unexpected tensor extra.weight"):
        build_causal_lm(src.config, sd | {"extra.weight": np.zeros(3, np.float32)})
    bad = sd | {"model.layers.0.mlp.up_proj.weight": np.zeros((512, 255), np.float32)}
    with pytest.raises(InputError, match=r"up_proj.weight expected shape \[512, 256\]"):
        build_causal_lm(src.config, bad)


def test_decoder_layer_rejects_other_layer(tiny_llama):
    src = load_model(tiny_llama)
    with pytest.raises(InputError, match="expected a tensor of layer 0"):
        DecoderLayer(src.layer_weights(1), src.arch, 0)


@pytest.mark.slow
def test_sample_model_matches_transformers_gguf_loader():
    """SmolLM2 Q4_1 GGUF: our loader + forward vs transformers' GGUF loader, 300 wiki tokens."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from qexport.model import sample_path
    try:
        path = sample_path("smollm2")
    except InputError as e:
        pytest.skip(str(e))
    src = load_model("sample:smollm2")
    ours = build_causal_lm(src.config, src.state_dict())
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, src.arch.vocab, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
