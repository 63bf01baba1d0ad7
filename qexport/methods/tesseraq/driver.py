"""TesseraQ over a whole model, block by block (llmc ``block_opt`` with ``quant_out``).

For decoder block ``i``: the *input* is the output of blocks ``0..i-1`` already quantized (their
exported weights), the *target* is the FP chain's output of block ``i`` (FP blocks all the way).
Per block: AWQ scales (folded into the norms / v_proj / up_proj) and auto-clip on the target
grids (:mod:`.awq`), a fixed grid per tensor (``grid_init``: LeanQuant's weighted search with
the inputs' mean squares, or min-max), then PAR + DST rounds (:mod:`.par`): harden at
each threshold, then ``iterations`` steps of a fresh Adam on the l2 block-output loss over random
batches of ``batch_size`` sequences cut to their first ``train_len`` tokens (exact under causal
attention). After the last round every variable is hard; codes ``c0 + up`` and the snapped DST
grid are exported, and the block's next input is computed with ``grids.dequantize`` of exactly
those codes, so the IR reproduces what the next block was calibrated on.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from qexport.errors import InputError
from qexport.grids import GridKind, GridSpec
from qexport.ir import QTensor
from qexport.methods.gptq import gptq_on_grid
from qexport.methods.result import check_spec_shape
from qexport.model.arch import LINEAR_MODULES

from .awq import AwqConfig, awq_block, fake_quant, input_hessians, input_importance
from .block import (batched, block_loss, block_output, full_name, relative_weights, swapped,
                    torch_threads, train_step)
from .levels import check_supported, fit_grid
from .par import RoundingVars
from .residual import fit_block_lorc, tune_block_lorc

__all__ = ["TesseraQOptions", "THRESHOLDS", "GRID_INITS", "ROUNDING_INITS", "LORC_MODES",
           "tesseraq_quantize_model"]

GRID_INITS = ("minmax", "search")
ROUNDING_INITS = ("nearest", "gptq")
LORC_MODES = ("after", "chain", "tune")

THRESHOLDS: dict[str, tuple[float, ...]] = {
    "20": (0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21, 0.18, 0.15, 0.12, 0.10,
           0.08, 0.06, 0.04, 0.02, 0.01, 0.005),      # TesseraQ W2/W3 configs
    "10": (0.75, 0.5, 0.375, 0.25, 0.125, 0.09, 0.06, 0.04, 0.02, 0.005),   # llmc default
}


@dataclass
class TesseraQOptions:
    """Hyper-parameters (recorded in the IR provenance).

    thresholds: "10", "20" (see :data:`THRESHOLDS`) or an explicit decreasing tuple in (0, 1).
    iterations: Adam steps per round; batch_size: sequences per step; train_len: tokens per
    sequence in a step (a prefix; 0 = whole sequence). lr: rounding logits; scale_lr /
    scale_wd: DST logits. dst: None = on for affine and fixed-table codebook specs, off for
    superblocks (integer sub-scales), True/False forces it. awq / awq_vo / clip: AWQ scale
    search (+ the GQA-tied v->o pair) and auto-clip; awq_samples: sequences for the AWQ search
    and clip statistics. grid_init: the fixed grid PAR rounds on: "search" (LeanQuant's
    weighted-error grid search on the AWQ-folded, clipped weights, weighted by the mean squared
    input of every column over the first ``awq_samples`` block inputs; lower block losses than
    min-max on calibration and held-out windows in ``tools/bench_tesseraq.py --holdout``) or
    "minmax" (the paper's). rounding_init: where the rounding variables start on that grid:
    "nearest" (the paper's: each weight's position between its two neighbouring levels, so
    the hard start is round-to-nearest) or "gptq" (the positions of the weights GPTQ's column
    loop rounds on the same grid, act-order, damp 0.01, Hessians from the block's quantized-
    chain inputs: the hard start is GPTQ's codes; ``up_flips`` then counts flips from those).
    lorc (with a LoRC rank): "after" fits each block's factors once its codes are final and
    leaves the next block's input without them (so the base is the plain run's, bit for bit);
    "chain" feeds the next block the compensated outputs, so its rounding is learnt on what
    the runtime computes with the adapter (as gptq / leanquant do); "tune" trains the factors
    on the block output (LoRA-style start, ``lorc_steps`` Adam steps at ``lorc_lr``, the base
    fixed; :func:`.residual.tune_block_lorc`) and chains them.
    eval_samples: sequences for the reported block losses. threads: torch threads for the run
    (batched forwards, AWQ); train_threads: for the PAR loop, whose steps are small (128
    tokens): one thread measured 4x less CPU than two on a busy 2-core machine.

    Defaults are sized for SmolLM2-135M (30 blocks, 128 x 512 calibration tokens) to finish in
    well under an hour on 2 CPU cores: the 20-threshold schedule x 48 steps of one 128-token
    prefix each (the paper's configs: 250 steps x 4 x 2048 tokens on a GPU). At a fixed token
    budget, more and smaller steps with a larger lr (2e-2 instead of 1e-3) gave the lowest block
    losses in ``tools/bench_tesseraq.py`` sweeps (blocks 0-1, W3 g32 asym).
    """

    thresholds: str | tuple[float, ...] = "20"
    iterations: int = 48
    batch_size: int = 1
    train_len: int = 128
    lr: float = 2e-2
    scale_lr: float = 1e-3
    scale_wd: float = 1e-4
    dst: bool | None = None
    awq: bool = True
    awq_vo: bool = True
    awq_grid: int = 20
    awq_samples: int = 4
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    eval_samples: int = 4
    grid_init: str = "search"
    rounding_init: str = "nearest"
    lorc: str = "after"
    lorc_steps: int = 240
    lorc_lr: float = 1e-3
    forward_batch: int = 8
    seed: int = 42
    threads: int | None = 2
    train_threads: int | None = 1
    progress: bool = True

    def schedule(self) -> tuple[float, ...]:
        t = THRESHOLDS.get(self.thresholds) if isinstance(self.thresholds, str) else \
            tuple(float(x) for x in self.thresholds)
        if t is None:
            raise InputError(f"tesseraq thresholds expected one of {sorted(THRESHOLDS)} or a "
                             f"list of floats (not {self.thresholds!r})")
        if any(not 0 < x < 1 for x in t):
            raise InputError(f"tesseraq thresholds expected values in (0, 1) (not {list(t)})")
        return t

    def check(self) -> None:
        self.schedule()
        for k in ("iterations", "batch_size", "awq_samples", "eval_samples", "forward_batch",
                  "clip_tokens", "awq_grid", "clip_grid"):
            if getattr(self, k) < (0 if k == "iterations" else 1):
                raise InputError(f"tesseraq option {k} expected >= 1 (not {getattr(self, k)})")
        if self.train_len < 0 or self.lr <= 0 or self.scale_lr <= 0:
            raise InputError("tesseraq options train_len >= 0, lr > 0, scale_lr > 0 expected")
        if self.grid_init not in GRID_INITS:
            raise InputError(f"tesseraq grid_init expected one of {list(GRID_INITS)} "
                             f"(not {self.grid_init!r})")
        if self.rounding_init not in ROUNDING_INITS:
            raise InputError(f"tesseraq rounding_init expected one of {list(ROUNDING_INITS)} "
                             f"(not {self.rounding_init!r})")
        if self.lorc_steps < 1 or self.lorc_lr <= 0:
            raise InputError(f"tesseraq lorc_steps >= 1 and lorc_lr > 0 expected (not "
                             f"{self.lorc_steps}, {self.lorc_lr})")
        if self.lorc not in LORC_MODES:
            raise InputError(f"tesseraq lorc expected one of {list(LORC_MODES)} "
                             f"(not {self.lorc!r})")
        if not 0 <= self.clip_max_shrink < 1:
            raise InputError(f"tesseraq clip_max_shrink expected in [0, 1) "
                             f"(not {self.clip_max_shrink})")

    def awq_config(self) -> AwqConfig:
        return AwqConfig(scale=self.awq, vo=self.awq_vo, n_grid=self.awq_grid, clip=self.clip,
                         clip_grid=self.clip_grid, max_shrink=self.clip_max_shrink,
                         clip_tokens=self.clip_tokens)

    def use_dst(self, spec: GridSpec) -> bool:
        return self.dst if self.dst is not None else spec.kind != GridKind.SUPERBLOCK


def _layer_specs(src: Any, plan: dict[str, Any]) -> dict[int, dict[str, GridSpec]]:
    """``{layer: {relative module: spec}}`` for the planned decoder linears, checked now."""
    out: dict[int, dict[str, GridSpec]] = {}
    shapes = src.arch.linear_shapes()
    for i in range(src.arch.n_layers):
        out[i] = {}
        for mod in LINEAR_MODULES:
            name = full_name(i, f"{mod}.weight")
            if name in plan:
                spec = plan[name].spec
                check_supported(spec, name)
                check_spec_shape(spec, shapes[mod], name)
                out[i][mod] = spec
    return out


def _check_samples(samples: torch.Tensor, vocab: int) -> None:
    if samples.dim() != 2 or samples.dtype not in (torch.int64, torch.int32):
        raise InputError(f"calibration samples expected int64 [N, T] (not {samples.dtype} "
                         f"{list(samples.shape)})")
    if int(samples.min()) < 0 or int(samples.max()) >= vocab:
        raise InputError(f"calibration samples expected token ids in [0, {vocab}) "
                         f"(found {int(samples.min())}..{int(samples.max())})")


def _train(layer: torch.nn.Module, tvars: dict[str, RoundingVars], h_in: torch.Tensor,
           y_ref: torch.Tensor, opts: TesseraQOptions, gen: torch.Generator,
           rope: tuple[torch.Tensor, torch.Tensor], where: str) -> list[float]:
    """PAR rounds over the block; returns the mean training loss of each round."""
    vs = [v.v for v in tvars.values() if v.dst]
    weights = lambda: {f"{m}.weight": v.weight() for m, v in tvars.items()}  # noqa: E731
    round_losses = []
    for k, tau in enumerate(opts.schedule()):
        for v in tvars.values():
            v.harden(tau)
        rs = [v.begin_round() for v in tvars.values()]
        groups = [{"params": rs, "lr": opts.lr, "weight_decay": 0.0}]
        if vs:
            groups.append({"params": vs, "lr": opts.scale_lr, "weight_decay": opts.scale_wd})
        opt = torch.optim.Adam(groups, fused=True)
        total = sum(train_step(layer, weights, h_in, y_ref, rope, opt, gen, opts.batch_size,
                               f"{where}: tesseraq round {k}") for _ in range(opts.iterations))
        for v in tvars.values():
            v.end_round()
        round_losses.append(total / max(opts.iterations, 1))
    for v in tvars.values():
        v.harden_all()
    return round_losses


def _eval_loss(layer: torch.nn.Module, W: dict[str, torch.Tensor], h: torch.Tensor,
               y: torch.Tensor, rope: Any, bs: int) -> float:
    with swapped(layer, W):
        return float(block_loss(y, block_output(layer, h, rope, bs)))


def _awq_init(make: Callable, orig: dict[str, torch.Tensor], specs: dict[str, GridSpec],
              h_q: torch.Tensor, rope: Any, arch: Any, opts: TesseraQOptions
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(clipped weights, folded weights before clipping, report)`` of the AWQ init."""
    if not (opts.awq or opts.clip):
        return orig, orig, {}
    folded: dict[str, torch.Tensor] = {}
    w, rep = awq_block(make, orig, specs, h_q[:opts.awq_samples], rope, arch,
                       opts.awq_config(), folded_out=folded)
    return w, folded, rep


def _export(i: int, tvars: dict[str, RoundingVars], w: dict[str, torch.Tensor]
            ) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """Validated QTensors and the block's weights with every quantized linear replaced by
    ``grids.dequantize`` of its export."""
    tensors, final = {}, dict(w)
    for m, v in tvars.items():
        qt = v.export().to_qtensor(v.name)
        tensors[v.name] = qt
        final[f"{m}.weight"] = torch.from_numpy(qt.dequantize())
    return tensors, final


def _quantize_block(src: Any, i: int, specs: dict[str, GridSpec], h_fp: torch.Tensor,
                    h_q: torch.Tensor, rope: Any, rope_train: Any, opts: TesseraQOptions,
                    fp_out: dict[str, np.ndarray] | None, lorc: tuple[int, str] = (0, "none")
                    ) -> tuple[dict[str, QTensor], dict[str, np.ndarray], dict[str, Any]]:
    """Quantize block ``i``; updates ``h_fp`` and ``h_q`` in place to the block's outputs.
    ``lorc``: (rank, weighting) of LoRC factors to fit here (rank 0: none)."""
    from qexport.model.forward import DecoderLayer
    t0 = time.perf_counter()
    arch, fb = src.arch, opts.forward_batch
    orig = relative_weights(src.layer_weights(i), i)
    make = lambda w: DecoderLayer(w, arch)                  # noqa: E731
    layer_fp = make(orig)
    y_fp = block_output(layer_fp, h_fp, rope, fb)
    if not specs:
        batched(lambda x: layer_fp(x, rope), h_q, fb, out=h_q)
        h_fp.copy_(y_fp)
        return {}, {}, {"layer": i, "quantized": 0}
    ev = slice(0, min(opts.eval_samples, h_q.shape[0]))
    rtn = {f"{m}.weight": fake_quant(orig[f"{m}.weight"], s, m) for m, s in specs.items()}
    loss_rtn = _eval_loss(layer_fp, rtn, h_q[ev], y_fp[ev], rope, fb)
    w, folded, awq_rep = _awq_init(make, orig, specs, h_q, rope, arch, opts)
    if fp_out is not None:
        fp_out.update({full_name(i, f"{m}.weight"): folded[f"{m}.weight"].numpy() for m in specs})
    t1 = time.perf_counter()
    layer = make(w)
    imp = (input_importance(layer, h_q[:opts.awq_samples], rope)
           if opts.grid_init == "search" else {})
    hess = input_hessians(layer, h_q, rope, fb) if opts.rounding_init == "gptq" else {}
    tvars = {}
    for m, s in specs.items():
        name, Wm = full_name(i, f"{m}.weight"), w[f"{m}.weight"].numpy()
        grid = fit_grid(s, Wm, name, imp.get(m))
        if m in hess:                       # start from the weights GPTQ rounds on this grid
            Wm = gptq_on_grid(Wm, hess[m], s, grid, name=name)[1]
        tvars[m] = RoundingVars(name, Wm, s, dst=opts.use_dst(s), grid=grid)
    nearest = {f"{m}.weight": v.hard_weight() for m, v in tvars.items()}
    loss_init = _eval_loss(layer, nearest, h_q[ev], y_fp[ev], rope, fb)
    gen = torch.Generator().manual_seed(opts.seed + i)
    with torch_threads(opts.train_threads):
        rounds = _train(layer, tvars, h_q, y_fp, opts, gen, rope_train, f"layer {i}")
    t2 = time.perf_counter()
    tensors, final = _export(i, tvars, w)
    layer_q, lorc_losses = make(final), []
    if lorc[0] > 0 and opts.lorc == "tune":
        with torch_threads(opts.train_threads):
            lorc_losses = tune_block_lorc(i, tensors, final, layer, h_q, y_fp, rope_train,
                                          lorc[0], steps=opts.lorc_steps, lr=opts.lorc_lr,
                                          batch_size=opts.batch_size, gen=gen)
        layer_q = make(final)
    elif lorc[0] > 0:
        fit_block_lorc(i, tensors, final, folded, layer_q, h_q, rope, lorc,
                       chain=opts.lorc == "chain", bs=fb)
        layer_q = make(final)
    t3 = time.perf_counter()                # export + LoRC factors (fitted or tuned)
    loss_final = float(block_loss(y_fp[ev], block_output(layer_q, h_q[ev], rope, fb)))
    batched(lambda x: layer_q(x, rope), h_q, fb, out=h_q)
    h_fp.copy_(y_fp)
    lin_weights = {f"{m}.weight" for m in LINEAR_MODULES}
    updates = {full_name(i, k): t.numpy().astype(np.float32) for k, t in w.items()
               if k not in lin_weights and not torch.equal(t, orig[k])}
    losses = {"block_loss_rtn": loss_rtn, "block_loss_awq_rtn": loss_init,
              "block_loss": loss_final}
    for qt in tensors.values():
        qt.stats.update(losses)
    stats = {"layer": i, "quantized": len(tensors), "loss_rtn": loss_rtn,
             "loss_awq_rtn": loss_init, "loss_final": loss_final, "round_losses": rounds,
             "awq": awq_rep, "seconds_awq": round(t1 - t0, 2),
             **({"lorc_losses": lorc_losses} if lorc_losses else {}),
             "seconds_train": round(t2 - t1, 2), "seconds_export_lorc": round(t3 - t2, 2),
             "seconds": round(time.perf_counter() - t0, 2)}
    return tensors, updates, stats


def tesseraq_quantize_model(src: Any, plan: dict[str, Any], samples: torch.Tensor,
                            opts: TesseraQOptions | None = None, *,
                            on_block_done: Callable[[int, dict[str, QTensor]], None] | None = None,
                            max_blocks: int | None = None,
                            fp_weights_out: dict[str, np.ndarray] | None = None,
                            keep_tensors: bool = True, lorc_rank: int = 0,
                            lorc_weight: str = "none"
                            ) -> tuple[dict[str, QTensor], dict[str, np.ndarray], dict[str, Any]]:
    """TesseraQ (AWQ init + PAR + DST) of every planned decoder linear of ``src``.

    Args:
        src: a :class:`qexport.model.SourceModel`.
        plan: ``{HF name: TensorPlan}``; decoder linears in it are quantized onto their spec
            (other planned tensors, e.g. embeddings, are left to the caller).
        samples: int64 ``[N, T]`` calibration token windows.
        opts: :class:`TesseraQOptions` (defaults sized for SmolLM2-135M on 2 cores).
        on_block_done: called with ``(layer index, that layer's QTensors)``.
        max_blocks: stop after this many blocks (benchmarks; the result is then partial).
        fp_weights_out: if given, receives ``{HF name: float32 [out, in]}``: each quantized
            linear's FP weight *after* AWQ folding, before clipping: the FP reference the
            QTensor approximates under the folded norms (use it, not the source weight, for a
            LoRC residual).
        keep_tensors: False = do not collect the QTensors (the returned dict is empty): the
            caller takes each block's from ``on_block_done`` (memory then does not grow with
            depth).
        lorc_rank, lorc_weight: LoRC factors of this rank (0: none) are fitted per block against
            the folded FP weights (:func:`qexport.methods.lorc.lorc_factors`; "hessian":
            weighted by the block's quantized-chain inputs); ``opts.lorc`` says whether the
            next block sees them.
    Returns:
        ``(tensors, passthrough_updates, stats)``: validated QTensors by HF name; float32 arrays
        that replace source passthrough tensors (norm weights and v_proj biases with the AWQ
        scales folded in: they are part of the quantized model); a JSON-able report
        ``{"options", "blocks": [...], "seconds"}``.
    """
    from tqdm import tqdm

    from qexport.model.forward import Rotary
    opts = opts or TesseraQOptions()
    opts.check()
    arch = src.arch
    _check_samples(samples, arch.vocab)
    specs = _layer_specs(src, plan)
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    tensors: dict[str, QTensor] = {}
    updates: dict[str, np.ndarray] = {}
    blocks = []
    try:
        with torch.no_grad():
            emb = torch.from_numpy(src.get("model.embed_tokens.weight"))
            h_fp = torch.nn.functional.embedding(samples.long(), emb)
        h_q = h_fp.clone()
        T = samples.shape[1]
        tl = T if opts.train_len == 0 else min(opts.train_len, T)
        rope, rope_train = Rotary(arch)(T), Rotary(arch)(tl)
        n_blocks = arch.n_layers if max_blocks is None else min(max_blocks, arch.n_layers)
        bar = tqdm(range(n_blocks), desc="tesseraq", unit="block", disable=not opts.progress)
        for i in bar:
            c0 = time.process_time()
            qts, upd, st = _quantize_block(src, i, specs[i], h_fp, h_q, rope, rope_train, opts,
                                           fp_weights_out, (lorc_rank, lorc_weight))
            st["cpu_seconds"] = round(time.process_time() - c0, 2)
            if keep_tensors:
                tensors.update(qts)
            updates.update(upd)
            blocks.append(st)
            if "loss_final" in st:
                bar.set_postfix(rtn=f"{st['loss_rtn']:.3g}", tq=f"{st['loss_final']:.3g}",
                                s=st["seconds"])
            if on_block_done is not None:
                on_block_done(i, qts)
    finally:
        torch.set_num_threads(old_threads)
    opt_rec = asdict(opts)
    opt_rec["thresholds"] = list(opts.schedule())
    opt_rec.pop("progress")
    return tensors, updates, {"options": opt_rec, "blocks": blocks,
                              "seconds": round(time.perf_counter() - t0, 2)}
