"""The options of ``qexport quantize`` and ``convert`` (one decorator, shared by both)."""
from __future__ import annotations

from typing import Any, Callable

import click

__all__ = ["quant_options"]


def quant_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the quantization options (method, grid, calibration, LoRC, tesseraq) to ``fn``."""
    opts = [
        click.option("--method", default="gptq", show_default=True,
                     type=click.Choice(["rtn", "gptq", "leanquant", "leanquant-nu",
                                        "tesseraq"]),
                     help="rtn: round to nearest (llama.cpp's quantizers on GGUF grids); "
                          "gptq; leanquant: loss-error-aware grids + GPTQ; leanquant-nu: "
                          "learned per-row codebooks (IR only); tesseraq: AWQ init + "
                          "block-wise adaptive rounding and scale tuning (--tq-* options)."),
        click.option("--to", "target", default="ir", show_default=True,
                     type=click.Choice(["ir", "gguf", "onnx", "vllm"]),
                     help="Target whose grid the codes must lie on."),
        click.option("--type", "gguf_type", default=None,
                     help="GGUF: a llama.cpp type or recipe (Q4_0, Q4_K_M, IQ4_XS, ...)."),
        click.option("--pure", is_flag=True, help="GGUF: one type for every tensor."),
        click.option("--override", multiple=True, metavar="REGEX=TYPE",
                     help="GGUF: per-tensor type override (repeatable)."),
        click.option("--grid", default=None,
                     help="Explicit grid name (affine-w4g128s, gguf-q4_k)."),
        click.option("--bits", default=4, show_default=True, type=click.IntRange(2, 8)),
        click.option("--group-size", default=128, show_default=True, type=int,
                     help="Columns per scale; -1 = per output channel."),
        click.option("--sym/--asym", default=True, show_default=True),
        click.option("--format", "fmt", default="ct", show_default=True,
                     type=click.Choice(["ct", "gptq"]), help="vLLM checkpoint format."),
        click.option("--calib", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Calibration text file (required by gptq)."),
        click.option("--n-samples", default=128, show_default=True, type=int),
        click.option("--seq-len", default=512, show_default=True, type=int),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--calib-sampling", default="random", show_default=True,
                     type=click.Choice(["random", "tiled"]),
                     help="Calibration windows: random = --n-samples seeded random windows "
                          "(may overlap); tiled = consecutive windows from the start of the "
                          "text, the chunks llama-imatrix reads (at most tokens / --seq-len)."),
        click.option("--damp", default=None, type=float,
                     help="Hessian dampening, fraction of mean(diag H) "
                          "[default: gptq 0.01, leanquant 0.1]."),
        click.option("--damp-mlp", default=None, type=float,
                     help="gptq/leanquant: dampening of the MLP linears (gate/up/down) "
                          "[default: --damp]; e.g. --damp 0.01 --damp-mlp 0.1."),
        click.option("--p", "p", default=None, type=float,
                     help="LeanQuant exponent of U_jj^-p [default: leanquant 2, leanquant-nu 4]."),
        click.option("--block-size", default=128, show_default=True, type=int,
                     help="GPTQ lazy-update block."),
        click.option("--act-order/--no-act-order", default=None,
                     help="gptq/leanquant: quantize columns by descending diag(H), with static "
                          "groups so the stored codes keep the original order [default: on "
                          "for gptq, off for leanquant]."),
        click.option("--static-groups", is_flag=True, help="GPTQ: fit all group grids up front."),
        click.option("--refit", default=0, show_default=True, type=click.IntRange(0, 16),
                     help="gptq/leanquant: re-fit the grids' float scales (and mins, d, dmin) "
                          "to the Hessian least-squares optimum for the chosen codes, N rounds "
                          "(GPTQ re-chooses the codes between rounds); 0 = off."),
        click.option("--cd", default=0, show_default=True, type=click.IntRange(0, 16),
                     help="gptq/leanquant(-nu): coordinate-descent passes over the codes on the "
                          "fixed grid, each weight moved to its best level for the layer "
                          "objective with the others held (QuantEase); in every --refit "
                          "round, or alone; 0 = off."),
        click.option("--refit-sub", is_flag=True,
                     help="with --refit: k-quant super-blocks (Q2_K..Q6_K) also re-choose their "
                          "integer sub-scales and sub-mins for the chosen codes, not only "
                          "d / dmin."),
        click.option("--v-hessian", default="attention", show_default=True,
                     type=click.Choice(["attention", "plain"]),
                     help="gptq/leanquant: v_proj's Hessian. attention: tokens weighted by the "
                          "squared attention they receive (attention sinks count; see README); "
                          "plain: reference GPTQ, every token alike."),
        click.option("--asym-calib", is_flag=True,
                     help="gptq/leanquant: asymmetric calibration (GPTAQ): each linear's codes "
                          "target the full-precision layer's output on the quantized model's "
                          "inputs, so earlier layers' errors are compensated (a second, FP "
                          "activation stream; ~2x calibration memory)."),
        click.option("--offload-activations", is_flag=True,
                     help="gptq/leanquant: keep the calibration activations in a temporary "
                          "file in $TMPDIR instead of RAM (same result, less memory)."),
        click.option("--e2e", default=0, show_default=True, type=click.IntRange(0, 64),
                     metavar="EPOCHS",
                     help="after the method: train the grids' float scales (codes fixed) and "
                          "the RMSNorm weights end to end against the full-precision model's "
                          "next-token distribution on the calibration windows, EPOCHS passes; "
                          "fp16-rounded, so every target holds them; 0 = off."),
        click.option("--e2e-lr", default=None, type=float,
                     help="--e2e: Adam learning rate of the relative factors [default: 5e-4]."),
        click.option("--e2e-granularity", default=None, type=click.Choice(["row", "block"]),
                     help="--e2e: one factor per output row (row) or per scale (block) "
                          "[default: row]."),
        click.option("--e2e-batch", default=None, type=click.IntRange(1),
                     help="--e2e: windows per step [default: 4]."),
        click.option("--e2e-train-len", default=None, type=click.IntRange(0),
                     help="--e2e: tokens of each window trained on (a prefix; 0 = whole) "
                          "[default: 256]."),
        click.option("--e2e-holdout", default=None, type=click.IntRange(0),
                     help="--e2e: windows left out of training; their KL before/after is "
                          "recorded in the provenance [default: 0]."),
        click.option("--e2e-no-norms", is_flag=True, help="--e2e: keep the norm weights."),
        click.option("--lorc-rank", default=0, show_default=True, type=int,
                     help="Add LoRC low-rank residual factors of this rank."),
        click.option("--lorc-weight", default="none", show_default=True,
                     type=click.Choice(["none", "hessian"]),
                     help="LoRC's error measure: none = ||W - Q||_F (ZeroQuant-V2); hessian = "
                          "the layer-output error on the calibration inputs (calibrated "
                          "methods)."),
        click.option("--imatrix", default=None, metavar="FILE|auto",
                     help="rtn on GGUF grids: importance matrix for llama.cpp's quantizers, a "
                          "llama-imatrix GGUF file (see `qexport imatrix`) or 'auto' = "
                          "computed from --calib; also selects llama-quantize's with-imatrix "
                          "recipe rules."),
        click.option("--tq-schedule", default=None, metavar="10|20|T1,T2,...",
                     help="tesseraq: hardening thresholds, one PAR round each: the 10- or "
                          "20-round schedule, or a decreasing list in (0,1) [default: 20]."),
        click.option("--tq-steps", default=None, type=click.IntRange(0),
                     help="tesseraq: Adam steps per round [default: 48]."),
        click.option("--tq-lr", default=None, type=float,
                     help="tesseraq: learning rate of the rounding variables [default: 2e-2]."),
        click.option("--tq-scale-lr", default=None, type=float,
                     help="tesseraq: learning rate of the DST scale factors [default: 1e-3]."),
        click.option("--tq-batch", default=None, type=click.IntRange(1),
                     help="tesseraq: sequences per step [default: 1]."),
        click.option("--tq-train-len", default=None, type=click.IntRange(0),
                     help="tesseraq: tokens per training sequence (a prefix; 0 = whole) "
                          "[default: 128]."),
        click.option("--tq-dst", default="auto", show_default=True,
                     type=click.Choice(["auto", "on", "off"]),
                     help="tesseraq: dequantization scale tuning (auto: off on k-quant "
                          "super-blocks, on elsewhere)."),
        click.option("--tq-awq-grid", default=None, type=click.IntRange(1),
                     help="tesseraq: points of the AWQ scale-exponent search [default: 20]."),
        click.option("--tq-grid-init", default=None, type=click.Choice(["minmax", "search"]),
                     help="tesseraq: the grid PAR rounds on: min-max (the paper's) or "
                          "LeanQuant's activation-weighted grid search [default: search]."),
        click.option("--tq-rounding-init", default=None, type=click.Choice(["nearest", "gptq"]),
                     help="tesseraq: where rounding starts on that grid: nearest (the "
                          "paper's) or GPTQ's codes on the same grid [default: nearest]."),
        click.option("--tq-lorc", default=None, type=click.Choice(["after", "chain", "tune"]),
                     help="tesseraq with --lorc-rank: after = SVD factors, the next block's "
                          "input leaves them out (base = the plain run); chain = it includes "
                          "them; tune = factors trained on the block output, chained "
                          "[default: after]."),
        click.option("--no-awq", is_flag=True, help="tesseraq: skip the AWQ scale search."),
        click.option("--no-clip", is_flag=True, help="tesseraq: skip the AWQ weight clipping."),
        click.option("--force", is_flag=True, help="Replace an existing output."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted gptq / leanquant run from its last "
                          "finished layer (checkpoints in OUTPUT.partial/; same settings "
                          "required)."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn
