"""``qexport quantize/convert --method tesseraq``: the IR lowers bit-exactly (``qexport verify``) to
GGUF, ONNX and vLLM; block losses and model outputs beat RTN; AWQ scales are folded into the
exported norms; LoRC takes the folded FP weights as reference (oracle: transformers' fp32 model
of the source); what tesseraq cannot do (``--resume``, free codebooks, GPTQ options) is refused
with one line and exit 2, nothing written.

Calibration: 8 windows x 32 tokens of Python source (the tiny tokenizer's domain), the 10-round
schedule x 8 steps, a 4-point AWQ search: a few seconds per run on one core.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clihelp import assert_clean_failure, run_cli, snapshot

from qexport.irio import load_ir
from qexport.model import load_model

pytestmark = pytest.mark.slow

TQ_FAST = ["--method", "tesseraq", "--n-samples", "8", "--seq-len", "32", "--tq-schedule", "10",
           "--tq-steps", "8", "--tq-awq-grid", "5", "--quiet"]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Random Llama with every linear's smaller side 64 (so LoRC rank 64 is full rank)."""
    from qexport.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("small"), "llama", hidden=64,
                           intermediate=128, layers=2, heads=2, kv_heads=2,
                           tokenizer_dir=tokenizer_dir)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def q4_0(tiny_llama: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tesseraq run onto GGUF Q4_0 (pure): IR folder + .gguf, and the RTN IR beside it."""
    d = tmp_path_factory.mktemp("tq-q4_0")
    res = run_cli("convert", tiny_llama, "--to", "gguf", "--type", "Q4_0", "--pure", *TQ_FAST,
                  "--calib", calib_file, "--save-ir", d / "tq.qir", "-o", d / "tq.gguf")
    assert res.exit_code == 0, (res.stderr, res.exception)
    res = run_cli("quantize", tiny_llama, "--to", "gguf", "--type", "Q4_0", "--pure",
                  "--method", "rtn", "--quiet", "-o", d / "rtn.qir")
    assert res.exit_code == 0, res.stderr
    return {"dir": d, "ir": d / "tq.qir", "gguf": d / "tq.gguf", "rtn": d / "rtn.qir"}


def _hf_logits(model_dir: Path, sd: dict[str, np.ndarray], ids: torch.Tensor) -> torch.Tensor:
    """Oracle: transformers' fp32 model of ``model_dir``'s config with ``sd`` loaded strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(str(model_dir))
    m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    m.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()},
                      strict=True)
    with torch.no_grad():
        return m(ids).logits


def _ids(calib_file: Path, model: Path, n: int = 4, t: int = 32) -> torch.Tensor:
    from qexport.calib import load_calibration
    src = load_model(model)
    return load_calibration(calib_file, src.tokenizer, n_samples=n, seq_len=t, seed=7)[0]


def test_gguf_is_bit_exact_under_verify(q4_0):
    res = run_cli("verify", q4_0["gguf"], "--ir", q4_0["ir"])
    assert res.exit_code == 0, res.output
    assert "OK: artifact matches the IR" in res.output
    qm = load_ir(q4_0["ir"])
    lin = [n for n in qm.tensors if n.startswith("model.layers.")]
    assert len(lin) == 14 and all(qm.tensors[n].stats["method"] == "tesseraq" for n in lin)
    assert qm.tensors["lm_head.weight"].stats["method"] == "llamacpp-rtn"


def test_block_losses_and_model_output_beat_rtn(q4_0, tiny_llama, calib_file):
    qm = load_ir(q4_0["ir"])
    blocks = qm.provenance["tesseraq"]["blocks"]
    assert [b["layer"] for b in blocks] == [0, 1]
    for b in blocks:
        assert b["loss_final"] < b["loss_rtn"], b
        assert b["loss_final"] < b["loss_awq_rtn"], b
        assert not any("seconds" in k for k in b)          # the IR stays deterministic
    qt = qm.tensors["model.layers.1.mlp.down_proj.weight"]
    assert qt.stats["block_loss"] == blocks[1]["loss_final"]
    # independent check on held-out windows: logits closer to the FP model than llama.cpp RTN
    ids = _ids(calib_file, tiny_llama)
    src = load_model(tiny_llama)
    ref = _hf_logits(tiny_llama, src.state_dict(), ids)
    err = {k: float((_hf_logits(tiny_llama, load_ir(q4_0[k]).state_dict(), ids) - ref)
                    .square().mean()) for k in ("ir", "rtn")}
    assert err["ir"] < err["rtn"], err


def test_awq_scales_are_folded_into_exported_norms(q4_0, tiny_llama):
    """The folded norms are in the IR and the GGUF (verify compared them), and they are what
    makes the quantized weights right: with the source norms the model is much worse."""
    qm = load_ir(q4_0["ir"])
    src = load_model(tiny_llama)
    moved = [n for n in qm.passthrough if n.endswith("layernorm.weight")
             and not np.array_equal(qm.passthrough[n], src.get(n))]
    ratios = [b["awq"]["scales"]["qkv"]["ratio"] for b in qm.provenance["tesseraq"]["blocks"]]
    assert any(r > 0 for r in ratios) and moved, (ratios, moved)
    assert np.array_equal(qm.passthrough["model.norm.weight"], src.get("model.norm.weight"))


def test_provenance_records_schedule_and_calibration(q4_0, calib_file):
    prov = load_ir(q4_0["ir"]).provenance
    assert prov["method"] == "tesseraq"
    assert prov["options"]["tesseraq"] == {"thresholds": "10", "iterations": 8, "awq_grid": 5}
    resolved = prov["tesseraq"]["options"]
    assert resolved["iterations"] == 8 and resolved["awq_grid"] == 5 and resolved["awq"]
    assert resolved["grid_init"] == "search"                # the default
    assert len(resolved["thresholds"]) == 10
    assert prov["calibration"]["text_sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    json.dumps(prov)                                      # JSON-able as written


@pytest.mark.parametrize("model,target", [
    ("tiny_llama", ["--to", "gguf", "--type", "Q4_K_S", "--pure", "--no-clip"]),  # rows of 256
    ("small_llama", ["--to", "gguf", "--type", "IQ4_NL", "--pure", "--tq-dst", "off"]),
    ("small_llama", ["--to", "onnx", "--bits", "4", "--group-size", "32", "--asym"]),
    ("small_llama", ["--to", "vllm", "--bits", "4", "--group-size", "32", "--sym"]),
], ids=["gguf-q4_k", "gguf-iq4_nl", "onnx", "vllm"])
def test_every_target_lowers_bit_exactly(model, target, calib_file, tmp_path, request):
    out = tmp_path / "out"
    res = run_cli("convert", request.getfixturevalue(model), *target, *TQ_FAST, "--tq-steps",
                  "2", "--calib", calib_file, "--save-ir", tmp_path / "ir", "-o", out)
    assert res.exit_code == 0, (res.stderr, res.exception)
    res = run_cli("verify", out, "--ir", tmp_path / "ir")
    assert res.exit_code == 0, res.output
    qm = load_ir(tmp_path / "ir")
    assert qm.tensors["model.layers.0.self_attn.q_proj.weight"].stats["method"] == "tesseraq"


def test_lorc_reference_is_the_folded_fp_weight(small_llama, calib_file, tmp_path):
    """Full-rank LoRC on top of tesseraq rebuilds the *source* model's function (with the
    folded norms) to fp16-factor round-off; residuals against the unfolded source weights
    would not (the AWQ scales would be applied twice)."""
    res = run_cli("quantize", small_llama, "--bits", "3", "--group-size", "32", "--asym",
                  *TQ_FAST, "--tq-steps", "2", "--lorc-rank", "64", "--calib", calib_file,
                  "-o", tmp_path / "ir")
    assert res.exit_code == 0, (res.stderr, res.exception)
    qm = load_ir(tmp_path / "ir")
    assert all(qt.residual is not None for n, qt in qm.tensors.items()
               if n.startswith("model.layers."))
    src = load_model(small_llama)
    ids = _ids(calib_file, small_llama, n=2)
    ref = _hf_logits(small_llama, src.state_dict(), ids)
    full = _hf_logits(small_llama, qm.state_dict(with_residual=True), ids)
    bare = _hf_logits(small_llama, qm.state_dict(with_residual=False), ids)
    assert (full - ref).abs().max() < 1e-3 * ref.abs().max()
    assert float((full - ref).square().mean()) < 1e-3 * float((bare - ref).square().mean())
    # the wrong reference: source weights + folded norms
    wrong = qm.state_dict(with_residual=False)
    wrong.update({n: src.get(n) for n in qm.tensors if n.startswith("model.layers.")})
    bad = _hf_logits(small_llama, wrong, ids)
    assert float((bad - ref).square().mean()) > 100 * float((full - ref).square().mean())


def test_lorc_leaves_tesseraq_codes_alone(small_llama, calib_file, tmp_path):
    """TesseraQ fits LoRC after each block from its final codes (the next block's input does
    not see the factors), so a LoRC run's base is the plain run, bit for bit, and
    ``eval --no-lorc`` of it measures the plain model (tools/bench_quality.py relies on this)."""
    common = ["--bits", "3", "--group-size", "32", "--asym", *TQ_FAST, "--calib", calib_file]
    for name, extra in (("plain", []), ("lorc", ["--lorc-rank", "8"])):
        res = run_cli("quantize", small_llama, *common, *extra, "-o", tmp_path / name)
        assert res.exit_code == 0, (res.stderr, res.exception)
    plain, lorc = load_ir(tmp_path / "plain"), load_ir(tmp_path / "lorc")
    assert sorted(plain.tensors) == sorted(lorc.tensors)
    for n, qt in plain.tensors.items():
        other = lorc.tensors[n]
        assert qt.residual is None and other.residual is not None, n
        np.testing.assert_array_equal(qt.codes, other.codes, err_msg=n)
        np.testing.assert_array_equal(qt.dequantize(), other.dequantize(with_residual=False),
                                      err_msg=n)
    for n, arr in plain.passthrough.items():          # the folded norms
        np.testing.assert_array_equal(arr, lorc.passthrough[n], err_msg=n)
    ev = ["--text", calib_file, "--ctx", "16", "--windows", "4", "--json", "--quiet"]
    got = {}
    for key, args in (("plain", [tmp_path / "plain"]), ("base", [tmp_path / "lorc", "--no-lorc"]),
                      ("lorc", [tmp_path / "lorc"])):
        res = run_cli("eval", *args, *ev)
        assert res.exit_code == 0, (res.stderr, res.exception)
        got[key] = json.loads(res.stdout[res.stdout.index("{"):])["all_targets"]
    assert got["base"] == got["plain"] and got["lorc"] != got["plain"], got
    res = run_cli("eval", small_llama, "--no-lorc", *ev)
    assert res.exit_code == 2 and "--no-lorc" in res.stderr and "IR folder" in res.stderr


def test_resume_is_refused(tiny_llama, calib_file, tmp_path):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, *TQ_FAST, "--calib", calib_file, "--resume",
                  "-o", tmp_path / "ir")
    assert_clean_failure(res, tmp_path, before, "--resume", "tesseraq")
    res = run_cli("convert", tiny_llama, "--to", "gguf", "--type", "Q4_0", *TQ_FAST,
                  "--calib", calib_file, "--resume", "-o", tmp_path / "m.gguf")
    assert_clean_failure(res, tmp_path, before, "--resume", "tesseraq")


@pytest.mark.parametrize("args,needles", [
    (["--grid", "codebook-w3row"], ["model.layers.0.self_attn.q_proj.weight", "leanquant-nu"]),
    (["--damp", "0.1"], ["--damp", "tesseraq"]),
    (["--act-order"], ["--act-order", "tesseraq"]),
    (["--tq-schedule", "0.5,x"], ["--tq-schedule"]),
    (["--tq-schedule", "0.5,1.5"], ["thresholds", "(0, 1)"]),
], ids=["free-codebook", "damp", "act-order", "schedule-syntax", "schedule-range"])
def test_bad_settings_are_refused(args, needles, tiny_llama, calib_file, tmp_path):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, *TQ_FAST, *args, "--calib", calib_file,
                  "-o", tmp_path / "ir")
    assert_clean_failure(res, tmp_path, before, *needles)


def test_tesseraq_options_need_tesseraq(tiny_llama, tmp_path):
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", "rtn", "--tq-steps", "4", "--quiet",
                  "-o", tmp_path / "ir")
    assert_clean_failure(res, tmp_path, before, "--tq-steps", "--method tesseraq")
    res = run_cli("quantize", tiny_llama, "--method", "tesseraq", "--quiet", "-o", tmp_path / "ir")
    assert_clean_failure(res, tmp_path, before, "--calib")


def test_lorc_chain_and_hessian_weighting(small_llama, calib_file, tmp_path):
    """``--tq-lorc chain``: block 0 is the plain run's and the next block learns on the
    compensated outputs (its codes change); ``--lorc-weight hessian`` keeps the base and fits
    other factors, with a lower output error on block 0's own inputs."""
    common = ["--bits", "2", "--group-size", "32", "--asym", *TQ_FAST, "--calib", calib_file,
              "--lorc-rank", "8"]
    runs = {"after": [], "chain": ["--tq-lorc", "chain"], "hess": ["--lorc-weight", "hessian"]}
    for name, extra in runs.items():
        res = run_cli("quantize", small_llama, *common, *extra, "-o", tmp_path / name)
        assert res.exit_code == 0, (res.stderr, res.exception)
    qm = {k: load_ir(tmp_path / k) for k in runs}
    assert qm["chain"].provenance["tesseraq"]["options"]["lorc"] == "chain"
    assert qm["hess"].provenance["options"]["lorc_weight"] == "hessian"
    names = sorted(qm["after"].tensors)
    changed = {n for n in names
               if not np.array_equal(qm["after"].tensors[n].codes, qm["chain"].tensors[n].codes)}
    assert changed and all(n.startswith("model.layers.1.") for n in changed), changed
    for n in names:
        a, h = qm["after"].tensors[n], qm["hess"].tensors[n]
        np.testing.assert_array_equal(a.codes, h.codes, err_msg=n)
        assert not np.array_equal(a.residual.B, h.residual.B), n
    # block 0's q_proj input: rmsnorm(embeddings) x the folded norm; its FP output is the
    # source's (AWQ folding keeps x @ W^T), so the error of base + factors needs no AWQ scale
    from qexport.calib import load_calibration
    src = load_model(small_llama)
    ids = load_calibration(calib_file, src.tokenizer, n_samples=8, seq_len=32, seed=0)[0]
    emb = torch.nn.functional.embedding(ids, torch.from_numpy(src.get("model.embed_tokens.weight")))
    rms = (emb * torch.rsqrt(emb.square().mean(-1, keepdim=True) + src.arch.rms_eps)).double()
    pre, name = "model.layers.0.", "model.layers.0.self_attn.q_proj.weight"
    y_fp = (rms * torch.from_numpy(src.get(pre + "input_layernorm.weight")).double()) @ \
        torch.from_numpy(src.get(name)).double().T
    x = rms * torch.from_numpy(qm["after"].passthrough[pre + "input_layernorm.weight"]).double()
    err = {k: float((x @ torch.from_numpy(qm[k].tensors[name].dequantize()).double().T - y_fp)
                    .norm()) for k in ("after", "hess")}
    base = float((x @ torch.from_numpy(qm["after"].tensors[name].dequantize(False)).double().T
                  - y_fp).norm())
    assert err["hess"] < 0.9 * err["after"] and err["after"] < base, (err, base)


def test_lorc_tune_lowers_the_block_loss(small_llama, calib_file, tmp_path):
    """``--tq-lorc tune``: block 0's codes are the plain run's, its factors (fp16, LoRA-style
    start) lower its block-output loss below the plain block's, and the IR evaluates."""
    common = ["--bits", "2", "--group-size", "32", "--asym", *TQ_FAST, "--calib", calib_file]
    runs = {"plain": [], "tune": ["--lorc-rank", "8", "--tq-lorc", "tune"]}
    for name, extra in runs.items():
        res = run_cli("quantize", small_llama, *common, *extra, "-o", tmp_path / name)
        assert res.exit_code == 0, (res.stderr, res.exception)
    plain, tune = load_ir(tmp_path / "plain"), load_ir(tmp_path / "tune")
    for n, qt in plain.tensors.items():
        if n.startswith("model.layers.0."):
            np.testing.assert_array_equal(qt.codes, tune.tensors[n].codes, err_msg=n)
        if n.startswith("model.layers."):
            tune.tensors[n].residual.validate(qt.shape, n)
    b0 = [prov["tesseraq"]["blocks"][0] for prov in (plain.provenance, tune.provenance)]
    assert b0[1]["loss_final"] < b0[0]["loss_final"], (b0[0]["loss_final"], b0[1]["loss_final"])
    assert b0[1]["lorc_losses"][-1] < b0[1]["lorc_losses"][0]
    res = run_cli("eval", tmp_path / "tune", "--text", calib_file, "--ctx", "16", "--windows",
                  "2", "--json", "--quiet")
    assert res.exit_code == 0, (res.stderr, res.exception)
