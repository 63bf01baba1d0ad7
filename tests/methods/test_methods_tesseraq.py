"""TesseraQ (AWQ init + PAR + DST) onto GridSpecs: RTN equivalence when everything is hard at the
nearest code, exact export, AWQ folding invariance, quality against RTN on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.backends.gguf.types import spec_for
from qexport.errors import InputError, LoweringError, UnsupportedError
from qexport.grids import AffineGrid, GridKind, GridSpec, ZeroDomain, dequantize, validate
from qexport.methods import rtn_quantize
from qexport.methods.tesseraq import (RoundingVars, TesseraQOptions, awq_block, dst_grid,
                                      fold_scales, rect_sigmoid, rect_sigmoid_inv,
                                      tesseraq_quantize_model)
from qexport.methods.tesseraq.awq import AwqConfig
from qexport.methods.tesseraq.block import block_loss, relative_weights
from qexport.methods.tesseraq.levels import fit_grid
from qexport.model import load_model
from qexport.model.forward import DecoderLayer, Rotary, build_causal_lm
from qexport.specs import TensorPlan

@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


AFFINE = [GridSpec.affine(3, 32, False), GridSpec.affine(2, 32, True),
          GridSpec.affine(4, 40, False), GridSpec.affine(3, -1, True),
          GridSpec(name="q4_1-like", kind=GridKind.AFFINE, bits=4, group_size=32,
                   zero=ZeroDomain.FLOAT)]


def _w(rng, out_f=24, in_f=96, scale=0.05):
    return (rng.standard_normal((out_f, in_f)) * scale + 0.01).astype(np.float32)


def _fast(**kw) -> TesseraQOptions:
    base = dict(thresholds=(0.5, 0.1), iterations=2, batch_size=2, train_len=16,
                awq_grid=3, awq_samples=2, clip_grid=4, clip_tokens=32, eval_samples=2,
                threads=1, progress=False)
    base.update(kw)
    return TesseraQOptions(**base)


def _samples(n=4, t=32, vocab=1000, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_rect_sigmoid_inverse_round_trips():
    p = torch.linspace(0, 1, 101)
    assert torch.allclose(rect_sigmoid(rect_sigmoid_inv(p)), p, atol=1e-6)
    assert float(rect_sigmoid(torch.tensor(-20.0))) == 0.0
    assert float(rect_sigmoid(torch.tensor(20.0))) == 1.0


@pytest.mark.parametrize("spec", AFFINE, ids=lambda s: s.name)
def test_all_hard_at_nearest_with_v0_is_rtn(rng, spec):
    W = _w(rng)
    tv = RoundingVars("t", W, spec)
    rtn = rtn_quantize(W, spec, name="t")
    assert np.array_equal(tv.hard_weight().numpy(), rtn.dequantize())   # before training
    tv.harden_all()                                    # r = h^-1(frac): up = 1[frac > 0.5]
    res = tv.export()
    assert np.array_equal(res.codes, rtn.codes)
    for k, arr in rtn.grid.arrays().items():
        assert np.array_equal(res.grid.arrays()[k], arr), k
    with torch.no_grad():                              # fake-quant forward, v = 0: f == 1
        assert np.array_equal(tv.weight().numpy(), rtn.dequantize())
    assert res.stats["up_flips"] == 0


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "IQ4_NL", "IQ4_XS", "Q6_K"])
def test_nearest_on_superblock_and_codebook_grids_matches_rtn(rng, name):
    spec = spec_for(name)
    W = _w(rng, 16, 512)
    tv = RoundingVars("t", W, spec)
    rtn = rtn_quantize(W, spec, name="t")
    tv.harden_all()
    res = tv.export()
    validate(res.codes, res.grid, spec, "t")
    # same grid; codes equal up to float ties between two levels
    assert np.mean(res.codes == rtn.codes) > 0.999
    err_tq = np.abs(res.dequantize() - W)
    err_rtn = np.abs(rtn.dequantize() - W)
    assert np.all(err_tq <= err_rtn + 1e-6)


def test_soft_forward_interpolates_between_neighbours(rng):
    spec = GridSpec.affine(3, 32, False)
    W = _w(rng)
    tv = RoundingVars("t", W, spec)
    with torch.no_grad():                              # soft at init: h(r) = frac -> w itself
        w = tv.weight().numpy()
    v0, v1 = tv.v0.numpy(), tv.v1.numpy()
    inside = (W - v0) * (W - v1) <= 0                   # beyond the grid's ends: the end level
    assert inside.mean() > 0.9
    assert np.allclose(w[inside], W[inside], atol=1e-6)
    end = np.where(np.abs(W - v0) < np.abs(W - v1), v0, v1)
    assert np.array_equal(w[~inside], end[~inside])


def test_harden_fraction_masks_and_monotone(rng):
    tv = RoundingVars("t", _w(rng, 32, 128), GridSpec.affine(3, 32, False))
    prev_soft, prev_up = tv.soft.clone(), tv.up.clone()
    g = torch.Generator().manual_seed(4)
    for tau in (0.75, 0.5, 0.25, 0.05):
        with torch.no_grad():
            tv.r.add_(torch.randn(tv.r.shape, generator=g) * 0.3)    # as if trained
        tv.harden(tau)
        assert tv.soft.dtype == torch.bool and torch.isfinite(tv.r).all()
        assert abs(tv.soft_fraction - tau) < 0.02
        stayed_hard = ~prev_soft
        assert not bool((tv.soft & stayed_hard).any())                 # hard stays hard
        assert torch.equal(tv.up[stayed_hard], prev_up[stayed_hard])   # decisions kept
        prev_soft, prev_up = tv.soft.clone(), tv.up.clone()
    tv.harden_all()
    assert not bool(tv.soft.any())


@pytest.mark.parametrize("spec", [GridSpec.affine(3, 32, False), spec_for("Q4_1"),
                                  spec_for("IQ4_NL"), spec_for("Q4_K")], ids=lambda s: s.name)
def test_export_reproduces_fake_quant(rng, spec):
    W = _w(rng, 16, 256)
    tv = RoundingVars("t", W, spec, dst=True)
    with torch.no_grad():
        tv.up.copy_(torch.rand(tv.up.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    tv.soft.zero_()
    res = tv.export()                                   # v = 0: bit-exact
    validate(res.codes, res.grid, spec, "t")
    assert np.array_equal(res.codes, tv.c0 + tv.up.numpy().astype(np.uint8))
    with torch.no_grad():
        assert np.array_equal(tv.weight().numpy(), dequantize(res.codes, res.grid, spec))
        tv.v.copy_(torch.randn(tv.v.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    res2 = tv.export()
    validate(res2.codes, res2.grid, spec, "t")
    assert np.array_equal(res2.codes, res.codes)
    with torch.no_grad():
        fq = tv.weight().numpy()
    deq = dequantize(res2.codes, res2.grid, spec)
    if spec.kind == GridKind.SUPERBLOCK:     # integer sub-scales/mins: rint(sc * f), rint(m * f)
        f = tv.dst_factor().detach().numpy()
        g0, g1 = res.grid, res2.grid
        lo, hi = spec.sub_scale_range
        assert np.array_equal(g1.sc, np.clip(np.rint(g0.sc * f), lo, hi))
        assert np.array_equal(g1.d, g0.d) and np.array_equal(g1.dmin, g0.dmin)
        cols = lambda a, n: np.repeat(a, n, axis=1)          # noqa: E731
        gs = spec.group_size
        want = (cols(g0.d, spec.super_size) * res.codes.astype(np.float32)
                * cols(g1.sc - g0.sc * f, gs)
                - cols(g0.dmin, spec.super_size) * cols(g1.m - g0.m * f, gs))
        assert np.allclose(deq - fq, want, atol=1e-5)
    else:                                # fp16 snapping of scale * f (and min * f): 2^-11
        assert np.abs(deq - fq).max() <= 2e-3 * np.abs(fq).max()
        assert not np.array_equal(deq, dequantize(res.codes, res.grid, spec))


def test_dst_grid_identity_at_one(rng):
    for spec in (GridSpec.affine(3, 32, False), spec_for("Q4_1"), spec_for("Q4_K"),
                 spec_for("IQ4_NL"), spec_for("Q4_0"), spec_for("Q8_0")):
        g = rtn_quantize(_w(rng, 8, 256), spec).grid
        grids = [g]
        if spec.name in ("gguf-q4_0", "gguf-q8_0"):      # GGUF's d may be negative: keep the sign
            grids.append(AffineGrid(scales=-g.scales))
        ng = spec.n_groups(256)
        for g in grids:
            g2 = dst_grid(spec, g, np.ones((8, ng), np.float32))
            for k, a in g.arrays().items():
                assert np.array_equal(g2.arrays()[k], a), (spec.name, k)


@pytest.mark.parametrize("spec", [GridSpec.affine(3, 32, False), spec_for("Q4_0"),
                                  spec_for("IQ4_NL"), spec_for("Q4_K")], ids=lambda s: s.name)
def test_search_init_grid_beats_minmax_and_exports_exactly(rng, spec):
    """grid_init="search": LeanQuant's weighted search (signed scales on Q4_0 / IQ4_NL) gives a
    lower weighted error than min-max, and the export still reproduces the hard forward."""
    W = _w(rng, 16, 256)
    imp = rng.random(256).astype(np.float32) ** 4
    tv_mm = RoundingVars("t", W, spec)
    tv = RoundingVars("t", W, spec, grid=fit_grid(spec, W, "t", imp))
    err = lambda w: float((((w.numpy() - W) ** 2) * imp).sum())     # noqa: E731
    assert err(tv.hard_weight()) < err(tv_mm.hard_weight())
    tv.harden_all()
    res = tv.export()
    validate(res.codes, res.grid, spec, "t")
    with torch.no_grad():
        assert np.array_equal(tv.weight().numpy(), dequantize(res.codes, res.grid, spec))


def test_free_codebook_and_bad_shape_refused(rng):
    free = GridSpec(name="lut", kind=GridKind.CODEBOOK, bits=3, group_size=-1,
                    free_codebook=True)
    with pytest.raises(UnsupportedError, match="free codebook"):
        RoundingVars("t", _w(rng), free)
    with pytest.raises(LoweringError, match="t"):
        RoundingVars("t", _w(rng, 8, 96), spec_for("Q4_K"))


# ---- AWQ -------------------------------------------------------------------------------
def _layer_setup(path, layer=0, n=4, t=32):
    src = load_model(path)
    w = relative_weights(src.layer_weights(layer), layer)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, t, src.arch.hidden, generator=g)
    h[..., 5] *= 8.0                                    # an outlier channel
    return src, w, h, Rotary(src.arch)(t)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_awq_folding_keeps_block_output(request, fixture):
    src, w, h, rope = _layer_setup(request.getfixturevalue(fixture))
    a = src.arch
    ref = DecoderLayer(w, a)(h, rope)
    g = torch.Generator().manual_seed(5)
    w2 = dict(w)
    kv = a.n_kv_heads * a.head_dim
    for pair, n in (("qkv", a.hidden), ("gate_up", a.hidden), ("down", a.intermediate)):
        s = torch.rand(n, generator=g) * 3 + 0.2
        fold_scales(w2, pair, s, s)
    s_kv = torch.rand(kv, generator=g) * 3 + 0.2       # GQA: tied over the heads of a group
    rep = a.n_heads // a.n_kv_heads
    s_o = s_kv.view(a.n_kv_heads, 1, a.head_dim).expand(-1, rep, -1).reshape(-1)
    fold_scales(w2, "vo", s_kv, s_o)
    out = DecoderLayer(w2, a)(h, rope)
    assert not torch.equal(w2["self_attn.v_proj.weight"], w["self_attn.v_proj.weight"])
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    # untied expansion (what a non-GQA fold would do) breaks it: the test can fail
    w3 = dict(w)
    fold_scales(w3, "vo", s_kv, s_kv.repeat(rep))
    assert not torch.allclose(DecoderLayer(w3, a)(h, rope), ref, rtol=1e-3, atol=1e-3)


def test_awq_block_search_is_exact_fold_and_helps(tiny_llama):
    src, w, h, rope = _layer_setup(tiny_llama)
    a = src.arch
    specs = {m: GridSpec.affine(3, 32, False) for m in a.linear_shapes()}
    make = lambda ww: DecoderLayer(ww, a)               # noqa: E731
    w2, rep = awq_block(make, w, specs, h, rope, a, AwqConfig(n_grid=6, clip=False))
    assert set(rep["scales"]) == {"qkv", "vo", "gate_up", "down"}
    assert all(r["loss"] <= r["loss_ratio0"] for r in rep["scales"].values())
    assert torch.allclose(make(w2)(h, rope), make(w)(h, rope), rtol=1e-5, atol=1e-5)
    folded: dict = {}
    w3, rep3 = awq_block(make, w, specs, h, rope, a, AwqConfig(n_grid=2, clip=True,
                                                                clip_grid=6, clip_tokens=64),
                         folded_out=folded)
    assert set(rep3["clip"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                 "mlp.up_proj", "mlp.down_proj"}
    assert torch.equal(w3["self_attn.q_proj.weight"], folded["self_attn.q_proj.weight"])
    assert not torch.equal(w3["mlp.up_proj.weight"], folded["mlp.up_proj.weight"])
    assert torch.equal(w3["input_layernorm.weight"], folded["input_layernorm.weight"])
    # a linear that is not quantized is never changed (its pairs are skipped)
    del specs["mlp.down_proj"]
    w4, rep4 = awq_block(make, w, specs, h, rope, a, AwqConfig(n_grid=2, clip=True, clip_grid=4,
                                                                clip_tokens=32))
    assert rep4["scales"]["down"] == {"skipped": True}
    assert torch.equal(w4["mlp.down_proj.weight"], w["mlp.down_proj.weight"])


# ---- whole model ----------------------------------------------------------------------
def _plan(src, spec):
    return {n: TensorPlan(spec) for n in src.linear_names()}


def _ir_block_losses(src, tensors, updates, samples, n_eval):
    """Block losses recomputed from the exported pieces alone (FP model vs IR model)."""
    sd = src.state_dict()
    ir = dict(sd)
    ir.update(updates)
    ir.update({n: qt.dequantize() for n, qt in tensors.items()})
    fp_m, q_m = build_causal_lm(src.config, sd), build_causal_lm(src.config, ir)
    rope = fp_m.rotary(samples.shape[1])
    x = samples[:n_eval]
    h_fp, h_q, out = fp_m.embed(x), q_m.embed(x), []
    with torch.no_grad():
        for lf, lq in zip(fp_m.layers, q_m.layers):
            h_fp = lf(h_fp, rope)
            out.append(float(block_loss(h_fp, lq(h_q, rope))))
            h_q = lq(h_q, rope)
    return out


@pytest.mark.parametrize("spec,init", [(GridSpec.affine(3, 32, False), "minmax"),
                                       (spec_for("Q4_K"), "minmax"),
                                       (spec_for("IQ4_NL"), "minmax"),
                                       (spec_for("Q4_0"), "search"),
                                       (spec_for("Q4_K"), "search"),
                                       (GridSpec.affine(2, 32, False), "search+gptq"),
                                       (spec_for("Q4_K"), "search+gptq")],
                         ids=lambda x: getattr(x, "name", x))
def test_model_export_reproduces_calibrated_forward(tiny_qwen2, spec, init):
    src = load_model(tiny_qwen2)
    samples = _samples()
    fp: dict = {}
    grid_init, _, rounding = init.partition("+")
    opts = _fast(grid_init=grid_init, rounding_init=rounding or "nearest")
    tensors, updates, stats = tesseraq_quantize_model(src, _plan(src, spec), samples, opts,
                                                      fp_weights_out=fp)
    assert set(tensors) == set(src.linear_names()) == set(fp)
    for qt in tensors.values():
        qt.validate()
        assert qt.spec == spec and qt.stats["method"] == "tesseraq"
    for b in stats["blocks"]:                           # folded norms are returned
        moved = b["awq"]["scales"]["qkv"]["ratio"] > 0
        assert moved == (f"model.layers.{b['layer']}.input_layernorm.weight" in updates)
    assert all(a.dtype == np.float32 for a in updates.values())
    got = _ir_block_losses(src, tensors, updates, samples, 2)
    want = [b["loss_final"] for b in stats["blocks"]]
    assert np.allclose(got, want, rtol=1e-4, atol=1e-7)
    # the folded FP weights with the updated norms are the same FP model
    sd = src.state_dict()
    folded = {**sd, **updates, **fp}
    ref = build_causal_lm(src.config, sd)(samples[:2])
    assert torch.allclose(build_causal_lm(src.config, folded)(samples[:2]), ref, rtol=1e-4,
                          atol=1e-4)


def test_no_awq_all_nearest_is_rtn_loss(tiny_llama):
    src = load_model(tiny_llama)
    opts = _fast(awq=False, clip=False, iterations=0, grid_init="minmax")
    _, updates, stats = tesseraq_quantize_model(src, _plan(src, GridSpec.affine(3, 32, False)),
                                                _samples(), opts)
    assert updates == {}
    for b in stats["blocks"]:
        assert b["loss_awq_rtn"] == b["loss_rtn"]


@pytest.mark.parametrize("bits", [2, 3])
def test_tesseraq_beats_rtn_on_tiny_llama(tiny_llama, bits):
    src = load_model(tiny_llama)
    spec = GridSpec.affine(bits, 32, False)
    opts = _fast(thresholds=(0.75, 0.5, 0.25, 0.1), iterations=8, batch_size=4, train_len=32,
                 lr=1e-2, awq_grid=10, awq_samples=4, clip_grid=20, clip_tokens=128)
    tensors, _, stats = tesseraq_quantize_model(src, _plan(src, spec), _samples(8, 32), opts)
    for b in stats["blocks"]:
        assert b["loss_final"] < b["loss_rtn"], b
        assert b["loss_final"] < b["loss_awq_rtn"], b
    assert sum(qt.stats["up_flips"] for qt in tensors.values()) > 0


@pytest.mark.parametrize("spec", [GridSpec.affine(2, 32, False), spec_for("Q4_K")],
                         ids=lambda s: s.name)
def test_gptq_rounding_init_starts_below_nearest(tiny_llama, spec):
    """rounding_init="gptq": before any training the hard weights are GPTQ's codes on the same
    grid, whose block loss is below round-to-nearest's in every block; with no training steps
    the export is exactly those codes."""
    src = load_model(tiny_llama)
    samples = _samples(8, 32)
    runs = {}
    for init in ("nearest", "gptq"):
        opts = _fast(iterations=0, rounding_init=init, awq_samples=4)
        runs[init] = tesseraq_quantize_model(src, _plan(src, spec), samples, opts)
    for bn, bg in zip(runs["nearest"][2]["blocks"], runs["gptq"][2]["blocks"]):
        assert bg["loss_awq_rtn"] < bn["loss_awq_rtn"], (bn["layer"], bg, bn)
    flips = sum(qt.stats["up_flips"] for qt in runs["gptq"][0].values())
    assert flips == 0                      # no steps: the export is the initial (GPTQ) codes
    moved = sum(int((runs["gptq"][0][n].codes != qt.codes).sum())
                for n, qt in runs["nearest"][0].items())
    assert moved > 0


def test_rounding_init_is_checked():
    with pytest.raises(InputError, match="rounding_init.*nearest.*gptq"):
        _fast(rounding_init="adaround").check()
