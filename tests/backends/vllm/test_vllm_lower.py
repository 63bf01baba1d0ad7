"""lower_vllm end to end on tiny_llama: folder contents, verify_vllm (ours + compressed-tensors),
transformers loading, and every refusal the formats need."""
from __future__ import annotations

import json

import pytest

from qexport.backends.vllm import lower_vllm, vllm_spec
from qexport.backends.vllm.verify import verify_vllm
from qexport.errors import InputError, LoweringError, UnsupportedError

from vllm_irutil import projections, rtn_qmodel


@pytest.mark.parametrize("key", ["ct_sym", "ct_asym", "gptq_sym", "ct_sym_lorc"])
def test_export_verifies_bit_exact(exports, key):
    folder, model = exports(key)
    rep = verify_vllm(folder, model)
    assert rep.ok, rep.summary()
    kinds = {c["check"] for c in rep.checks}
    assert {"fields.codes", "fields.scales", "dense", "config"} <= kinds
    if key.startswith("ct"):
        assert {"library.float16", "library.float32"} <= kinds
    if key == "ct_sym_lorc":
        assert {"adapter.lora_A", "adapter.lora_B", "adapter.scaling"} <= kinds


def test_folder_contents_ct(exports):
    from safetensors.torch import load_file
    folder, model = exports("ct_asym")
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16"
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["version"] == "0.17.0"   # 4-bit: both layouts
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"]) \
        == (4, 32, "group", False)
    t = load_file(str(folder / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"                     # [256, 512]
    assert t[f"{p}.weight_packed"].shape == (256, 64)
    assert t[f"{p}.weight_scale"].shape == (256, 16)
    assert str(t[f"{p}.weight_scale"].dtype) == "torch.float16"
    assert t[f"{p}.weight_zero_point"].shape == (32, 16)
    assert t[f"{p}.weight_shape"].tolist() == [256, 512]
    assert str(t["lm_head.weight"].dtype) == "torch.float16"
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (folder / f).is_file()
    ct = pytest.importorskip("compressed_tensors")
    ct.QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                          if k not in ("version", "sparsity_config",
                                                       "transform_config")})


def test_folder_contents_gptq(exports):
    from safetensors.torch import load_file
    folder, _ = exports("gptq_sym")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((folder / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) \
        == (4, 32, True, False, "gptq")
    t = load_file(str(folder / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"                     # in 512, out 256
    assert t[f"{p}.qweight"].shape == (64, 256) and t[f"{p}.qzeros"].shape == (16, 32)
    assert t[f"{p}.scales"].shape == (16, 256) and t[f"{p}.g_idx"].shape == (512,)


def test_verify_catches_a_flipped_bit(exports, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    folder, model = exports("ct_asym")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    t = load_file(str(bad / "model.safetensors"))
    k = "model.layers.1.self_attn.v_proj.weight_packed"
    t[k][3, 5] ^= 1 << 9
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rep = verify_vllm(bad, model)
    failed = {(c["tensor"], c["check"]) for c in rep.failures()}
    assert ("model.layers.1.self_attn.v_proj.weight", "fields.codes") in failed
    assert ("model.layers.1.self_attn.v_proj.weight", "library.float16") in failed


@pytest.mark.slow
def test_transformers_loads_ct_folder(exports):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    folder, model = exports("ct_asym")
    m = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = m.state_dict()
    for name, qt in model.tensors.items():
        assert torch.equal(sd[name], torch.from_numpy(qt.dequantize()).to(torch.float16)), name


def test_verify_notes_gptqmodel_absent(exports, monkeypatch):
    """Without the GPTQModel venv verify still passes on qexport's decoder and says what it
    skipped (the GPTQModel decode itself: test_vllm_gptqmodel.py)."""
    folder, model = exports("gptq_sym")
    monkeypatch.setenv("QEXPORT_GPTQMODEL_PYTHON", "")
    rep = verify_vllm(folder, model, gptqmodel=True)
    assert rep.ok and not any(c["check"].startswith("gptqmodel") for c in rep.checks)
    assert any("GPTQModel venv absent" in n for n in rep.notes), rep.notes
    assert any("gptqmodel=False" in n for n in verify_vllm(folder, model).notes)


# ---- refusals ---------------------------------------------------------------------------
def test_group_not_dividing_in_features(tiny_llama, tmp_path):
    from qexport.grids import GridSpec
    ragged = GridSpec.affine(4, 96, True)                  # 256 % 96 != 0
    model = rtn_qmodel(tiny_llama, projections(ragged))
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: .*"
                                            r"divisible by group size 96 \(found 512\)"):
        lower_vllm(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gptq_refuses_zero_point_zero(tiny_llama, tmp_path):
    model = rtn_qmodel(tiny_llama, projections(vllm_spec(4, 32, False, fmt="ct")))
    qt = model.tensors["model.layers.1.mlp.up_proj.weight"]
    qt.grid.zeros[2, 3] = 0
    with pytest.raises(LoweringError) as e:
        lower_vllm(model, tmp_path / "x", fmt="gptq")
    msg = str(e.value)
    assert "model.layers" in msg and "--format ct" in msg and "zero point 0" in msg
    assert not (tmp_path / "x").exists()
    lower_vllm(model, tmp_path / "ct", fmt="ct")           # CT holds it
    assert verify_vllm(tmp_path / "ct", model).ok


def test_mismatched_qkv_grids_refused(tiny_llama, tmp_path):
    a, b = vllm_spec(4, 32, True), vllm_spec(4, 64, True)
    model = rtn_qmodel(tiny_llama, lambda n: (b if n.endswith("layers.0.self_attn.k_proj.weight")
                                              else a if n.endswith("_proj.weight") else None))
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.self_attn.*q_proj/k_proj/v_proj"
                                            r".*k_proj\.weight: w4g64s"):
        lower_vllm(model, tmp_path / "x")


def test_partly_dense_gate_up_refused(tiny_llama, tmp_path):
    spec = vllm_spec(4, 32, True)
    model = rtn_qmodel(tiny_llama, lambda n: None if n.endswith("layers.1.mlp.up_proj.weight")
                       else spec if n.endswith("_proj.weight") else None)
    with pytest.raises(LoweringError, match=r"up_proj\.weight: dense"):
        lower_vllm(model, tmp_path / "x")


def test_mixed_grids_ct_groups_and_gptq_refusal(tiny_llama, tmp_path):
    s4, s8 = vllm_spec(4, 32, True), vllm_spec(8, 64, False)
    model = rtn_qmodel(tiny_llama, lambda n: s8 if "down_proj" in n
                       else s4 if n.endswith("_proj.weight") else None)
    out = lower_vllm(model, tmp_path / "mixed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert all("Linear" not in g["targets"] for g in qc["config_groups"].values())
    assert verify_vllm(out, model).ok
    with pytest.raises(LoweringError, match="one bits/group/sym.*--format ct"):
        lower_vllm(model, tmp_path / "g", fmt="gptq")


def test_bad_bits_dtype_and_grid_kind(tiny_llama, tmp_path):
    with pytest.raises(UnsupportedError, match="gptq cannot hold 5-bit.*--format ct"):
        vllm_spec(5, 32, True, fmt="gptq")
    model = rtn_qmodel(tiny_llama, projections(vllm_spec(4, 32, True)))
    with pytest.raises(UnsupportedError, match="float16 or bfloat16"):
        lower_vllm(model, tmp_path / "x", dtype="float32")
    from qexport.grids import GridSpec, ZeroDomain
    fmin = GridSpec.affine(4, 32, False, zero=ZeroDomain.FLOAT)
    with pytest.raises(LoweringError, match="not an integer affine grid"):
        lower_vllm(rtn_qmodel(tiny_llama, projections(fmin)), tmp_path / "y")


def test_bf16_needs_bf16_representable_scales(tiny_llama, tmp_path):
    model = rtn_qmodel(tiny_llama, projections(vllm_spec(4, 32, True)))   # fp16 scales
    with pytest.raises(LoweringError, match=r"scales: expected values representable in bf16"):
        lower_vllm(model, tmp_path / "x", dtype="bfloat16")
    m16 = rtn_qmodel(tiny_llama, projections(vllm_spec(4, 32, True, scale_dtype="bf16")))
    out = lower_vllm(m16, tmp_path / "bf", dtype="bfloat16")
    assert verify_vllm(out, m16).ok


def test_bf16_gptq_warns_when_gptqmodel_would_round_scales(tiny_llama, tmp_path):
    """GPTQModel keeps GPTQ scales in fp16: a bf16 scale that is no fp16 value is named."""
    import warnings
    m16 = rtn_qmodel(tiny_llama, projections(vllm_spec(4, 32, True, scale_dtype="bf16")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # typical scales: fp16 values, no warning
        lower_vllm(m16, tmp_path / "ok", fmt="gptq", dtype="bfloat16")
    name = "model.layers.1.mlp.up_proj.weight"
    m16.tensors[name].grid.scales[0, 0] = (1 + 2.0 ** -7) * 2.0 ** -20  # bf16; fp16: subnormal
    with pytest.warns(UserWarning, match=rf"{name} \(1 scales\).*--dtype float16"):
        out = lower_vllm(m16, tmp_path / "g", fmt="gptq", dtype="bfloat16")
    assert verify_vllm(out, m16).ok                     # the folder itself is exact


def test_existing_output_needs_force(exports, tmp_path):
    folder, model = exports("ct_sym")
    with pytest.raises(InputError, match="--force"):
        lower_vllm(model, folder)
    lower_vllm(model, tmp_path / "again")
    lower_vllm(model, tmp_path / "again", force=True)


def test_tied_embeddings_not_written(tiny_qwen2, tmp_path):
    from safetensors.torch import load_file
    model = rtn_qmodel(tiny_qwen2, projections(vllm_spec(4, 32, False)))
    out = lower_vllm(model, tmp_path / "q")
    t = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in t and "model.layers.0.self_attn.q_proj.bias" in t
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert verify_vllm(out, model).ok


def test_odd_bit_widths_dense_by_default(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    model = rtn_qmodel(tiny_llama, projections(vllm_spec(3, 64, False)))
    with pytest.warns(UserWarning, match="vLLM-CPU runs only"):
        dense = lower_vllm(model, tmp_path / "d")
    word = lower_vllm(model, tmp_path / "w", ct_layout="word")
    p = "model.layers.0.mlp.down_proj.weight_packed"      # in 512: dense 48 words, word 52
    assert load_file(str(dense / "model.safetensors"))[p].shape == (256, 48)
    assert load_file(str(word / "model.safetensors"))[p].shape == (256, 52)
    assert json.loads((dense / "config.json").read_text())["quantization_config"]["version"] \
        == "0.18.0"
    for f in (dense, word):
        rep = verify_vllm(f, model)
        assert rep.ok, rep.summary()
    from packaging.version import Version
    ct = pytest.importorskip("compressed_tensors")
    rep = verify_vllm(dense, model)
    if Version(ct.__version__) < Version("0.18.0"):       # CT 0.17 reads only the word layout
        assert any("library check skipped" in n for n in rep.notes)
    else:
        assert "library.float16" in {c["check"] for c in rep.checks}
    assert "library.float16" in {c["check"] for c in verify_vllm(word, model).checks}
