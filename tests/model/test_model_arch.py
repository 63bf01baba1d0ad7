"""ArchInfo parsing: supported architectures, strict field checks, rope scaling, linear names."""
from __future__ import annotations

import json

import pytest

from qexport.errors import InputError, UnsupportedError
from qexport.model import SUPPORTED, ArchInfo, linear_names


def _cfg(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_parse_tiny_llama(tiny_llama):
    a = ArchInfo.from_config(_cfg(tiny_llama))
    assert a.architecture == "LlamaForCausalLM"
    assert (a.n_layers, a.hidden, a.intermediate) == (2, 256, 512)
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.vocab) == (4, 2, 64, 1000)
    assert a.rope_type == "default" and a.rope_theta == 10000.0 and a.rms_eps == 1e-5
    assert not a.tie_word_embeddings and not a.attention_bias and a.biased_linears == ()
    assert a.linear_shapes()["self_attn.k_proj"] == (128, 256)
    assert a.expected_shapes()["lm_head.weight"] == (1000, 256)


def test_parse_qwen2_has_qkv_bias_and_tied(tiny_qwen2):
    a = ArchInfo.from_config(_cfg(tiny_qwen2))
    assert a.attention_bias and a.tie_word_embeddings
    assert a.biased_linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    shapes = a.expected_shapes()
    assert "lm_head.weight" not in shapes
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (128,)
    assert "model.layers.1.self_attn.o_proj.bias" not in shapes


def test_parse_stories260k(stories260k):
    a = ArchInfo.from_config(_cfg(stories260k))
    assert (a.hidden, a.intermediate, a.n_heads, a.n_kv_heads, a.head_dim) == (64, 172, 8, 4, 8)
    assert a.tie_word_embeddings


def test_linear_names_true_sequential_order():
    groups = linear_names(3)
    assert [len(g) for g in groups] == [3, 1, 2, 1]
    assert groups[0] == ["model.layers.3.self_attn.q_proj.weight",
                         "model.layers.3.self_attn.k_proj.weight",
                         "model.layers.3.self_attn.v_proj.weight"]
    assert groups[1] == ["model.layers.3.self_attn.o_proj.weight"]
    assert groups[2] == ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    assert groups[3] == ["model.layers.3.mlp.down_proj.weight"]


def test_unsupported_architecture_lists_supported(tiny_llama):
    cfg = _cfg(tiny_llama) | {"architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UnsupportedError) as e:
        ArchInfo.from_config(cfg)
    for name in SUPPORTED:
        assert name in str(e.value)
    assert "GPT2LMHeadModel" in str(e.value)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "intermediate_size",
                                   "vocab_size", "rms_norm_eps", "architectures"])
def test_missing_field_named(tiny_llama, field):
    cfg = _cfg(tiny_llama)
    del cfg[field]
    with pytest.raises(InputError, match=field):
        ArchInfo.from_config(cfg)


def test_inconsistent_fields(tiny_llama):
    with pytest.raises(InputError, match="num_key_value_heads.*not 3"):
        ArchInfo.from_config(_cfg(tiny_llama) | {"num_key_value_heads": 3})
    with pytest.raises(InputError, match="hidden_size.*expected int.*str"):
        ArchInfo.from_config(_cfg(tiny_llama) | {"hidden_size": "256"})
    with pytest.raises(InputError, match="num_hidden_layers.*positive"):
        ArchInfo.from_config(_cfg(tiny_llama) | {"num_hidden_layers": 0})
    with pytest.raises(UnsupportedError, match="hidden_act"):
        ArchInfo.from_config(_cfg(tiny_llama) | {"hidden_act": "gelu"})


def test_rope_scaling_forms(tiny_llama):
    base = {k: v for k, v in _cfg(tiny_llama).items() if k != "rope_parameters"}
    legacy = ArchInfo.from_config(base | {"rope_theta": 5e5, "rope_scaling": None})
    assert legacy.rope_theta == 5e5 and legacy.rope_type == "default"
    l3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    a = ArchInfo.from_config(base | {"rope_theta": 5e5, "rope_scaling": l3})
    assert a.rope_type == "llama3" and a.rope_scaling["factor"] == 8.0
    b = ArchInfo.from_config(base | {"rope_parameters": {"rope_theta": 5e5, **l3}})
    assert b == a
    with pytest.raises(UnsupportedError, match="yarn.*default, llama3"):
        ArchInfo.from_config(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(InputError, match="low_freq_factor"):
        ArchInfo.from_config(base | {"rope_scaling": {k: v for k, v in l3.items()
                                                      if k != "low_freq_factor"}})


def test_qwen2_sliding_window_refused(tiny_qwen2):
    with pytest.raises(UnsupportedError, match="sliding"):
        ArchInfo.from_config(_cfg(tiny_qwen2) | {"use_sliding_window": True})


def test_linear_weight_names(tiny_llama):
    a = ArchInfo.from_config(_cfg(tiny_llama))
    names = a.linear_weight_names()
    assert len(names) == 14 and names[0].endswith("0.self_attn.q_proj.weight")
    assert names[-1] == "model.layers.1.mlp.down_proj.weight"
