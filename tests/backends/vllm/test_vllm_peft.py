"""LoRC factors as a PEFT LoRA adapter: loaded by peft onto the IR's dequantized base model, the
output equals the IR's full value dequant + A @ B."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _dense_model(model, with_residual):
    import transformers
    cfg = transformers.AutoConfig.for_model(**model.config)
    m = getattr(transformers, model.architecture)(cfg).float().eval()
    sd = {k: torch.from_numpy(v) for k, v in model.state_dict(with_residual).items()}
    m.load_state_dict(sd, strict=True)
    return m


def test_adapter_config(exports):
    from qexport.backends.vllm.peft import adapter_dir
    folder, model = exports("ct_sym_lorc")
    cfg = json.loads((adapter_dir(folder) / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 4)
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                     "up_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(folder.resolve())


def test_peft_output_is_dequant_plus_lorc(exports):
    from peft import PeftModel
    from qexport.backends.vllm.peft import adapter_dir
    folder, model = exports("ct_sym_lorc")
    ids = torch.tensor([[1, 317, 617, 260, 830, 316, 900, 971]])
    full = _dense_model(model, with_residual=True)
    base_only = _dense_model(model, with_residual=False)
    with torch.no_grad():
        want = full(ids).logits
        base = base_only(ids).logits
        pm = PeftModel.from_pretrained(_dense_model(model, with_residual=False),
                                       str(adapter_dir(folder))).eval()
        got = pm(ids).logits
    assert float((base - want).abs().max()) > 1e-2            # the adapter matters
    assert float((got - want).abs().max()) < 1e-4
    merged = pm.merge_and_unload().state_dict()
    for name, qt in model.tensors.items():
        np.testing.assert_allclose(merged[name].numpy(), qt.dequantize(with_residual=True),
                                   rtol=0, atol=1e-6, err_msg=name)
