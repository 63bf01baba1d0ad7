"""quantize: source model + per-tensor plan -> QModel (the IR).

Steps (named, in order): load the plan's weights, calibrate (methods that need a Hessian),
quantize each linear onto its GridSpec layer by layer, RTN the planned tensors that have no
calibration inputs (embeddings, lm_head), add LoRC residuals, collect passthrough tensors, and
record the recipe and provenance.
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from qexport.errors import NumericsError, UnsupportedError
from qexport.ir import QModel, QTensor
from qexport.specs import TensorPlan, linear_names

__all__ = ["QuantizeOptions", "METHODS", "quantize_model"]

METHODS = ("rtn", "gptq", "leanquant", "leanquant-nu")
CALIBRATED = {"gptq", "leanquant", "leanquant-nu"}
#: Hessian dampening (fraction of mean diag H) when --damp is not given: the reference codes'
DEFAULT_PERCDAMP = {"gptq": 0.01, "leanquant": 0.1, "leanquant-nu": 0.1}


@dataclass
class QuantizeOptions:
    """Hyper-parameters of a quantization run (all recorded in the IR's provenance)."""

    method: str = "gptq"
    calib: str | None = None
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    blocksize: int = 128
    percdamp: float | None = None          # None: the method's default (DEFAULT_PERCDAMP)
    p: float | None = None                 # LeanQuant exponent (aff default 2, nu default 4)
    act_order: bool = False
    static_groups: bool = False
    lorc_rank: int = 0
    imatrix: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise UnsupportedError(f"unknown method {self.method!r}; expected one of "
                                   f"{list(METHODS)}")
        if self.method in CALIBRATED and not self.calib:
            raise UnsupportedError(f"--method {self.method} needs calibration text (--calib FILE)")


def _rtn(name: str, W: np.ndarray, plan: TensorPlan, imatrix: np.ndarray | None) -> QTensor:
    spec = plan.spec
    if spec.name.startswith("gguf-"):
        # --method rtn on GGUF grids reproduces llama.cpp's own reference quantizers
        from qexport.backends.gguf.llamacpp_quants import llamacpp_quantize
        spec.check_shape(W.shape, name)
        codes, grid = llamacpp_quantize(W, spec.name[5:].upper(), imatrix)
        return QTensor(name, codes, grid, spec, stats={"method": "llamacpp-rtn"})
    from qexport.methods.rtn import rtn_quantize
    return rtn_quantize(W, spec, name=name).to_qtensor(name)


def _check_finite(name: str, W: np.ndarray) -> None:
    bad = ~np.isfinite(W)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise NumericsError(f"{name}: expected finite weights (found {W[r, c]} at [{r}, {c}], "
                            f"{int(bad.sum())} non-finite in all)")


def _add_lorc(qt: QTensor, W: np.ndarray, rank: int) -> None:
    from qexport.methods.lorc import lorc_factors
    qt.residual = lorc_factors(W, qt.dequantize(with_residual=False), rank)


def _layer_quantizer(opts: QuantizeOptions) -> Callable[..., Any]:
    """``(W, H, spec, name) -> QuantResult`` for the calibrated method of ``opts``."""
    damp = opts.percdamp if opts.percdamp is not None else DEFAULT_PERCDAMP[opts.method]
    common = {"blocksize": opts.blocksize, "percdamp": damp}
    if opts.method == "gptq":
        from qexport.methods.gptq import gptq_quantize
        return lambda W, H, spec, name: gptq_quantize(
            W, H, spec, name=name, actorder=opts.act_order, static_groups=opts.static_groups,
            **common)
    from qexport.methods.leanquant import leanquant_aff_quantize, leanquant_nu_quantize
    if opts.method == "leanquant":
        return lambda W, H, spec, name: leanquant_aff_quantize(
            W, H, spec, name=name, p=2.0 if opts.p is None else opts.p,
            actorder=opts.act_order, static_groups=opts.static_groups, **common)
    # LeanQuant-nu: act-order is the reference default and codebooks are static per row
    return lambda W, H, spec, name: leanquant_nu_quantize(
        W, H, spec, name=name, p=4.0 if opts.p is None else opts.p, actorder=True,
        seed=opts.seed, **common)


def _untimed(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without wall-clock entries (``seconds*``), so that the IR is deterministic."""
    return {k: v for k, v in stats.items() if not str(k).startswith("seconds")}


def quantize_model(src: Any, plan: dict[str, TensorPlan], opts: QuantizeOptions,
                   *, on_tensor: Callable[[str, QTensor], None] | None = None,
                   checkpoint: Any = None) -> QModel:
    """Quantize every tensor of ``plan`` (HF names) from ``src`` (a qexport.model SourceModel).

    ``checkpoint``: a :class:`qexport.checkpoint.Checkpoint`; calibrated methods then save every
    finished decoder layer to it and, when it holds an interrupted run with the same settings,
    restore the finished layers and continue from the next one (same result, same bytes).
    Wall-clock timings are left out of the IR (stats and provenance) to keep it deterministic.
    """
    opts.check()
    n_layers = int(src.arch.n_layers)
    linears = [n for n in linear_names(n_layers) if n in plan]
    tensors: dict[str, QTensor] = {}
    calib_info: dict[str, Any] = {}
    originals: dict[str, np.ndarray] = {}

    def finish(name: str, qt: QTensor, W: np.ndarray) -> QTensor:
        if opts.lorc_rank > 0:
            _add_lorc(qt, W, opts.lorc_rank)
        qt.stats = _untimed(qt.stats)
        tensors[name] = qt
        if on_tensor is not None:
            on_tensor(name, qt)
        return qt

    if opts.method in CALIBRATED:
        import torch

        from qexport.calib import load_calibration, quantize_layerwise
        layer_quantizer = _layer_quantizer(opts)
        samples, calib_info = load_calibration(opts.calib, src.tokenizer, n_samples=opts.n_samples,
                                               seq_len=opts.seq_len, seed=opts.seed)

        def quantize_fn(name: str, W: "torch.Tensor", H: "torch.Tensor") -> "torch.Tensor":
            if name not in plan:
                return W
            Wn = W.detach().cpu().numpy().astype(np.float32)
            _check_finite(name, Wn)
            res = layer_quantizer(Wn, H, plan[name].spec, name)
            qt = finish(name, res.to_qtensor(name), Wn)
            return torch.from_numpy(qt.dequantize())

        # --- resume hooks (checkpoint.py): restore finished layers, save each new one ---
        start, hidden, on_state = 0, None, None
        if checkpoint is not None:
            from qexport.checkpoint import run_settings
            start, hidden, restored = checkpoint.begin(run_settings(src, plan, opts, calib_info))
            tensors.update(restored)

            def on_state(i: int, h: "torch.Tensor") -> None:
                prefix = f"model.layers.{i}."
                checkpoint.save_layer(i, {n: qt for n, qt in tensors.items()
                                          if n.startswith(prefix)}, h)
        quantize_layerwise(src, samples, quantize_fn, progress=opts.progress,
                           start_layer=start, hidden=hidden, on_layer_state=on_state)
    else:
        from tqdm import tqdm
        for name in tqdm(linears, desc="rtn", disable=not opts.progress, unit="tensor"):
            W = src.get(name)
            _check_finite(name, W)
            finish(name, _rtn(name, W, plan[name], None), W)
    for name in plan:                                    # embeddings / lm_head etc.
        if name not in tensors:
            W = src.get(name)
            _check_finite(name, W)
            finish(name, _rtn(name, W, plan[name], None), W)
    passthrough = {n: np.asarray(src.get(n), dtype=np.float32)
                   for n in src.tensor_names() if n not in tensors}
    prov = {"method": opts.method, "options": {k: v for k, v in asdict(opts).items()
                                               if k not in ("progress",)},
            "calibration": calib_info, "source": getattr(src, "source", ""), "host": platform.machine()}
    recipe = {"tensors": {n: p.to_dict() for n, p in plan.items()}}
    return QModel(config=dict(src.config), tensors=tensors, passthrough=passthrough,
                  tokenizer=dict(src.tokenizer), recipe=recipe, provenance=prov)


def text_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
