"""Asymmetric calibration (``--asym-calib``, qexport/calib_asym.py).

Oracles: the objective identity ``sum ||W x - Q x~||^2 = tr((W' - Q) H (W' - Q)^T) + const`` by
direct summation; and transformers' own forward passes of the FP model and of the final
quantized model (hooks on every linear's input), from which ``P``, ``H`` and the target
``W' = W + W P (H + lambda I)^-1`` are rebuilt independently of qexport's two streams.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clihelp import GPTQ_FAST, assert_clean_failure, interrupted_run, run_cli, snapshot

from qexport.calib import HessianAccumulator, quantize_layerwise
from qexport.calib_asym import CrossAccumulator, asym_target
from qexport.model import load_model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _streams(seed: int = 0, n: int = 3, t: int = 40, d: int = 24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    return x, x + 0.2 * torch.randn(n, t, d, generator=g)


def test_target_objective_equals_the_asymmetric_one() -> None:
    x, xq = _streams()
    d, o = x.shape[-1], 10
    acc, cross = HessianAccumulator(d), CrossAccumulator(d)
    for sl in (slice(0, 2), slice(2, 3)):                     # running average over batches
        acc.add(xq[sl])
        cross.add(x[sl], xq[sl])
    g = torch.Generator().manual_seed(1)
    W = torch.randn(o, d, generator=g)
    Wt = asym_target(W, acc.H, cross.P, 0.0).double()

    def direct(Q):
        r = x.reshape(-1, d).double() @ W.double().T - xq.reshape(-1, d).double() @ Q.T
        return float((r ** 2).sum()) * 2 / x.shape[0]

    def via_target(Q):
        E = Wt - Q
        return float(torch.trace(E @ acc.H.double() @ E.T))
    Qs = [torch.randn(o, d, generator=g, dtype=torch.float64) for _ in range(3)]
    for Qa, Qb in zip(Qs, Qs[1:]):
        assert direct(Qa) - direct(Qb) == pytest.approx(via_target(Qa) - via_target(Qb),
                                                        rel=1e-4)


def test_target_is_w_when_the_streams_agree() -> None:
    x, _ = _streams()
    acc, cross = HessianAccumulator(24), CrossAccumulator(24)
    acc.add(x)
    cross.add(x, x)
    W = torch.randn(5, 24)
    assert torch.equal(asym_target(W, acc.H, cross.P, 0.1), W)


def test_weighted_cross_term_matches_direct_sum() -> None:
    x, xq = _streams(2)
    w = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(3)) + 0.1
    cross = CrossAccumulator(24)
    cross.add(x, xq, w)
    wn = w / w.mean(-1, keepdim=True)
    want = 2 / x.shape[0] * torch.einsum("btd,bte,bt->de", (x - xq).double(), xq.double(),
                                         wn.double())
    torch.testing.assert_close(cross.P.double(), want, atol=1e-4, rtol=1e-4)


def _hooked_inputs(path: Path, state: dict[str, torch.Tensor] | None, samples: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """Every linear's input in transformers' forward (weights replaced by ``state``)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if state:
        m.load_state_dict(state, strict=False)
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, i[0]))
             for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        m(samples)
    for h in hooks:
        h.remove()
    return {f"{n}.weight": v.double() for n, v in seen.items()}


def test_targets_match_transformers_streams(tiny_llama: Path) -> None:
    src = load_model(tiny_llama)
    samples = torch.randint(3, src.arch.vocab, (4, 24), generator=torch.Generator().manual_seed(5))
    got, quant = {}, {}

    def qfn(name, W, H):                       # a crude "quantizer": 1/8 steps
        got[name] = (W.double().clone(), H.double().clone())
        quant[name] = torch.round(W * 8) / 8
        return quant[name]
    quantize_layerwise(src, samples, qfn, progress=False, batch_size=3, v_hessian="plain",
                       asym_damp=0.05)
    fp_in = _hooked_inputs(tiny_llama, None, samples)
    q_in = _hooked_inputs(tiny_llama, {k[:-len(".weight")] + ".weight": v
                                       for k, v in quant.items()}, samples)
    n_lin = 0
    for name, (Wt, H) in got.items():
        x, xq = fp_in[name], q_in[name]
        d = x.shape[-1]
        flat_q, delta = xq.reshape(-1, d), (x - xq).reshape(-1, d)
        H_o = 2 / samples.shape[0] * flat_q.T @ flat_q
        P_o = 2 / samples.shape[0] * delta.T @ flat_q
        torch.testing.assert_close(H, H_o, atol=1e-3, rtol=1e-3)
        W = torch.from_numpy(src.get(name)).double()
        Hd = H_o + 0.05 * torch.diagonal(H_o).mean() * torch.eye(d, dtype=torch.float64)
        want = W + W @ P_o @ torch.linalg.inv(Hd)
        torch.testing.assert_close(Wt, want, atol=2e-4, rtol=1e-3)
        n_lin += 1
    assert n_lin == 14
    # layer 0's q/k/v see the same embeddings in both streams: their target is W itself
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[q0][0].float(), torch.from_numpy(src.get(q0)))
    assert not torch.allclose(got["model.layers.1.mlp.down_proj.weight"][0],
                              torch.from_numpy(src.get("model.layers.1.mlp.down_proj.weight"))
                              .double(), atol=1e-3)


def test_asym_lowers_the_final_hidden_error(tiny_llama: Path) -> None:
    """In-sample: the last hidden state of the quantized model is closer to the FP model's."""
    from qexport.methods.gptq import gptq_quantize
    from qexport.specs import resolve_spec
    src = load_model(tiny_llama)
    spec = resolve_spec("affine-w3g32a")
    samples = torch.randint(3, src.arch.vocab, (8, 48), generator=torch.Generator().manual_seed(7))
    fp = _hooked_inputs(tiny_llama, None, samples)["lm_head.weight"]
    err = {}
    for damp in (None, 0.01):
        q = {}

        def qfn(name, W, H):
            q[name] = torch.from_numpy(gptq_quantize(W, H, spec, name=name).dequantize())
            return q[name]
        quantize_layerwise(src, samples, qfn, progress=False, asym_damp=damp)
        out = _hooked_inputs(tiny_llama, q, samples)["lm_head.weight"]
        err[damp] = float(((out - fp) ** 2).mean())
    assert err[0.01] < 0.9 * err[None], err


def test_cli_asym_is_deterministic_and_differs(tiny_llama: Path, calib_file: Path,
                                               tmp_path: Path) -> None:
    outs = []
    for k, flag in enumerate(([], ["--asym-calib"], ["--asym-calib"])):
        out = tmp_path / f"m{k}.qir"
        res = run_cli("quantize", tiny_llama, *GPTQ_FAST, *flag, "--calib", calib_file,
                      "-o", out)
        assert res.exit_code == 0, res.stderr
        outs.append(snapshot(out))
    assert outs[1] == outs[2]
    assert outs[0] != outs[1]
    import json
    prov = json.loads((tmp_path / "m1.qir" / "manifest.json").read_text())
    assert prov["provenance"]["options"]["asym_calib"] is True


@pytest.mark.parametrize("args,needle", [
    (["--method", "rtn"], "not rtn"),
    (["--method", "gptq", "--lorc-rank", "2"], "--lorc-rank"),
], ids=["rtn", "lorc"])
def test_cli_asym_refusals(tiny_llama: Path, calib_file: Path, tmp_path: Path, args,
                           needle) -> None:
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, *args, "--asym-calib", "--calib", calib_file,
                  "--quiet", "-o", tmp_path / "x.qir")
    assert_clean_failure(res, tmp_path, before, "--asym-calib", needle)


def test_resume_rebuilds_the_fp_stream(tiny_llama: Path, calib_file: Path, tmp_path: Path,
                                       monkeypatch) -> None:
    ref = tmp_path / "ref.qir"
    args = [*GPTQ_FAST, "--asym-calib", "--calib", calib_file]
    assert run_cli("quantize", tiny_llama, *args, "-o", ref).exit_code == 0
    out = tmp_path / "m.qir"
    assert interrupted_run(monkeypatch, "quantize", tiny_llama, *args, "-o", out).exit_code == 130
    res = run_cli("quantize", tiny_llama, *args, "-o", out, "--resume")
    assert res.exit_code == 0, res.stderr
    assert snapshot(out) == snapshot(ref) != {}
