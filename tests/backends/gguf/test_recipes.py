"""llama-quantize mixture rules (backends/gguf/recipes.py) on the sample model's shapes and on
hand-checked cases. The runtime test (test_llamacpp_runtime.py) compares the plans with what
llama.cpp's own ``llama_model_quantize`` picks."""
from __future__ import annotations

from collections import Counter

import pytest

from qexport.backends.gguf.recipes import (RECIPES, plan_recipe, recipe_file_type,
                                           use_more_bits)
from qexport.errors import UnsupportedError


def shapes_for(layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
               tied: bool) -> tuple[dict, dict]:
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": hidden}
    hd = hidden // heads
    sh = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        sh["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        sh.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (kv * hd, hidden),
                   p + "self_attn.v_proj.weight": (kv * hd, hidden),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (ffn, hidden),
                   p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn),
                   p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)})
    return cfg, sh


SAMPLE = shapes_for(30, 576, 1536, 9, 3, 49152, tied=True)   # SmolLM2-135M
UMB30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_use_more_bits_32_layers() -> None:
    # gguf-format.md section 4.4: layers {0,1,2,3,6,9,...,27,28,29,30,31} for 32 layers
    assert {i for i in range(32) if use_more_bits(i, 32)} == \
        {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert {i for i in range(30) if use_more_bits(i, 30)} == UMB30


def test_q4_k_m_on_sample_model() -> None:
    cfg, sh = SAMPLE
    plan = plan_recipe("Q4_K_M", cfg, sh)
    emb = plan["model.embed_tokens.weight"]
    assert emb.type_name == "Q8_0" and "tied" in emb.reason      # tied, 576 % 256 != 0
    for i in range(30):
        p = f"model.layers.{i}."
        for part in ("q_proj", "k_proj", "o_proj"):
            t = plan[p + f"self_attn.{part}.weight"]
            assert t.type_name == "Q5_0" and "fallback Q4_K->Q5_0: 576 % 256 != 0" in t.reason
        for part in ("gate_proj", "up_proj"):
            assert plan[p + f"mlp.{part}.weight"].type_name == "Q5_0"
        v, down = plan[p + "self_attn.v_proj.weight"], plan[p + "mlp.down_proj.weight"]
        if i in UMB30:
            assert v.type_name == "Q8_0" and "Q6_K->Q8_0" in v.reason
            assert down.type_name == "Q6_K" and "ffn_down" in down.reason
        else:
            assert v.type_name == "Q5_0"
            assert down.type_name == "Q4_K" and down.reason == "default Q4_K"  # 1536 = 6 * 256
        assert plan[p + "input_layernorm.weight"].type_name == "F32"
    counts = Counter(t.type_name for t in plan.values())
    assert counts == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_plans_sample(recipe: str) -> None:
    cfg, sh = SAMPLE
    plan = plan_recipe(recipe, cfg, sh)
    assert set(plan) == set(sh)
    for name, t in plan.items():
        blk = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
               "IQ4_XS": 256}.get(t.type_name, 32)
        if t.type_name != "F32":
            assert sh[name][-1] % blk == 0, (name, t)
    assert recipe_file_type(recipe) > 0


def test_file_types() -> None:
    assert recipe_file_type("Q4_K_M") == 15
    assert recipe_file_type("Q8_0") == 7
    assert recipe_file_type("IQ4_XS") == 30


def test_unknown_recipe_lists_valid_names() -> None:
    cfg, sh = SAMPLE
    with pytest.raises(UnsupportedError, match="Q4_K_M") as e:
        plan_recipe("Q4_K_X", cfg, sh)
    assert "Q4_K_X" in str(e.value) and "IQ4_XS" in str(e.value)


def test_untied_output_and_embedding_at_256() -> None:
    cfg, sh = shapes_for(8, 512, 1024, 8, 2, 1000, tied=False)
    plan = plan_recipe("Q4_K_M", cfg, sh)
    assert plan["lm_head.weight"].type_name == "Q6_K"
    assert plan["model.embed_tokens.weight"].type_name == "Q4_K"   # untied: default type
    plan8 = plan_recipe("Q8_0", cfg, sh)
    assert plan8["lm_head.weight"].type_name == "Q8_0"


def test_q2_k_depends_on_gqa() -> None:
    cfg, sh = shapes_for(8, 512, 1024, 8, 2, 1000, tied=False)      # n_gqa 4
    assert plan_recipe("Q2_K", cfg, sh)["model.layers.3.self_attn.v_proj.weight"].type_name \
        == "Q4_K"
    cfg, sh = shapes_for(8, 512, 1024, 8, 4, 1000, tied=False)      # n_gqa 2
    plan = plan_recipe("Q2_K", cfg, sh)
    assert plan["model.layers.3.self_attn.v_proj.weight"].type_name == "Q3_K"
    assert plan["model.layers.3.mlp.down_proj.weight"].type_name == "Q3_K"
    assert plan["model.layers.3.self_attn.o_proj.weight"].type_name == "Q3_K"
    assert plan["model.layers.3.mlp.up_proj.weight"].type_name == "Q2_K"


def test_q3_k_m_and_q4_k_s_layers() -> None:
    cfg, sh = shapes_for(16, 512, 1024, 8, 2, 1000, tied=False)
    p3 = plan_recipe("Q3_K_M", cfg, sh)
    assert [p3[f"model.layers.{i}.self_attn.v_proj.weight"].type_name for i in range(3)] == \
        ["Q5_K", "Q5_K", "Q4_K"]
    assert [p3[f"model.layers.{i}.mlp.down_proj.weight"].type_name for i in range(2)] == \
        ["Q5_K", "Q4_K"]                                             # i < 16/16
    assert p3["model.layers.5.self_attn.o_proj.weight"].type_name == "Q4_K"
    p4 = plan_recipe("Q4_K_S", cfg, sh)
    assert [p4[f"model.layers.{i}.self_attn.v_proj.weight"].type_name for i in range(5)] == \
        ["Q5_K"] * 4 + ["Q4_K"]
    assert [p4[f"model.layers.{i}.mlp.down_proj.weight"].type_name for i in range(3)] == \
        ["Q5_K", "Q5_K", "Q4_K"]


def test_iq4_rules_and_fallbacks() -> None:
    cfg, sh = shapes_for(16, 576, 1536, 8, 2, 1000, tied=False)     # n_gqa 4
    plan = plan_recipe("IQ4_XS", cfg, sh)
    assert plan["model.layers.0.self_attn.q_proj.weight"].type_name == "IQ4_NL"
    assert plan["model.layers.0.self_attn.v_proj.weight"].type_name == "Q5_1"  # Q5_K fallback
    assert plan["model.layers.0.mlp.down_proj.weight"].type_name == "Q5_K"     # i < n/8
    assert plan["model.layers.2.mlp.down_proj.weight"].type_name == "IQ4_XS"
    with_im = plan_recipe("IQ4_XS", cfg, sh, imatrix=True)
    assert with_im["model.layers.0.mlp.down_proj.weight"].type_name == "IQ4_XS"


def test_fallback_to_f16_when_row_not_multiple_of_32() -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
           "num_attention_heads": 1, "num_key_value_heads": 1}
    plan = plan_recipe("Q4_K_M", cfg, {"model.layers.0.mlp.up_proj.weight": (64, 100)})
    t = plan["model.layers.0.mlp.up_proj.weight"]
    assert t.type_name == "F16" and "100 % 256" in t.reason


def test_pure_and_overrides() -> None:
    cfg, sh = SAMPLE
    pure = plan_recipe("Q4_K_M", cfg, sh, pure=True)
    assert pure["model.layers.0.mlp.down_proj.weight"].type_name == "Q4_K"
    assert pure["model.layers.0.self_attn.v_proj.weight"].type_name == "Q5_0"
    assert pure["model.embed_tokens.weight"].type_name == "Q5_0"
    ov = plan_recipe("Q4_K_M", cfg, sh, overrides={r"ffn_down": "Q8_0", r"attn_q\.": "Q6_K"})
    assert ov["model.layers.4.mlp.down_proj.weight"].type_name == "Q8_0"
    q = ov["model.layers.4.self_attn.q_proj.weight"]
    assert q.type_name == "Q8_0" and "override" in q.reason and "Q6_K->Q8_0" in q.reason
    with pytest.raises(UnsupportedError, match="Q4_X"):
        plan_recipe("Q4_K_M", cfg, sh, overrides={"ffn": "Q4_X"})
