"""quantize: source model + per-tensor plan -> QModel (the IR).

Steps (named, in order): load the plan's weights, calibrate (methods that need a Hessian),
quantize each linear onto its GridSpec layer by layer, RTN the planned tensors that have no
calibration inputs (embeddings, lm_head), add LoRC residuals, collect passthrough tensors,
record the recipe and provenance, and (``e2e_epochs``) tune the float grid parameters end to
end (:mod:`qexport.e2e_stage`).
"""
from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from qexport.errors import NumericsError, UnsupportedError
from qexport.ir import QModel, QTensor
from qexport.specs import TensorPlan, linear_names

__all__ = ["QuantizeOptions", "METHODS", "quantize_model"]

METHODS = ("rtn", "gptq", "leanquant", "leanquant-nu", "tesseraq")
CALIBRATED = {"gptq", "leanquant", "leanquant-nu", "tesseraq"}
_LAYERWISE = ("gptq", "leanquant", "leanquant-nu")      # calib.quantize_layerwise's methods


@dataclass
class QuantizeOptions:
    """Hyper-parameters of a quantization run (all recorded in the IR's provenance)."""

    method: str = "gptq"
    calib: str | None = None
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    calib_sampling: str = "random"         # calib.CALIB_SAMPLING: random windows or tiled
    blocksize: int = 128
    percdamp: float | None = None          # None: layer_quantizer.DEFAULT_PERCDAMP
    percdamp_mlp: float | None = None      # gate/up/down's percdamp (None: percdamp's)
    p: float | None = None                 # LeanQuant exponent (aff default 2, nu default 4)
    act_order: bool | None = None          # None: layer_quantizer.DEFAULT_ACT_ORDER
    static_groups: bool = False
    refit: int = 0                         # methods.refit rounds after gptq / leanquant (0: off)
    refit_sub: bool = False                # the re-fit re-chooses k-quant sub-scales (refit_sub)
    cd: int = 0                            # methods.cd passes over the codes (0: off)
    v_hessian: str = "attention"           # calib.V_HESSIANS: "plain" is reference GPTQ
    asym_calib: bool = False               # target the FP layer's output (calib_asym.py)
    offload_activations: bool = False      # calibration residual stream in a $TMPDIR file
    lorc_rank: int = 0
    lorc_weight: str = "none"              # methods.lorc.LORC_WEIGHTS: "hessian" needs calib
    imatrix: str | None = None             # rtn on GGUF grids: llama-imatrix GGUF path or "auto"
    tesseraq: dict[str, Any] = field(default_factory=dict)   # TesseraQOptions overrides
    e2e_epochs: int = 0                    # e2e_stage: end-to-end float tuning epochs (0: off)
    e2e_options: dict[str, Any] = field(default_factory=dict)  # E2EOptions overrides
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise UnsupportedError(f"unknown method {self.method!r}; expected one of "
                                   f"{list(METHODS)}")
        if self.method in CALIBRATED and not self.calib:
            raise UnsupportedError(f"--method {self.method} needs calibration text (--calib FILE)")
        self._check_imatrix()
        self._check_lorc()
        self._check_refit()
        from qexport.e2e_stage import check_e2e
        check_e2e(self)
        if self.asym_calib and self.method not in _LAYERWISE:
            raise UnsupportedError(f"--asym-calib applies to the layer-wise calibrated methods "
                                   f"{', '.join(_LAYERWISE)} (not {self.method})")
        if self.asym_calib and self.lorc_rank > 0:
            raise UnsupportedError("--asym-calib with --lorc-rank is not supported: the codes "
                                   "approximate a re-targeted weight, so W - Q is not the "
                                   "error LoRC should compensate; leave one out")
        if self.offload_activations and self.method not in _LAYERWISE:
            raise UnsupportedError(f"--offload-activations applies to the layer-wise calibrated "
                                   f"methods {', '.join(_LAYERWISE)} (not {self.method})")
        if self.method == "tesseraq":
            _check_tesseraq_options(self)
        elif self.tesseraq:
            raise UnsupportedError(f"tesseraq options ({', '.join(sorted(self.tesseraq))}) "
                                   f"apply to --method tesseraq only (not {self.method})")

    def _check_lorc(self) -> None:
        from qexport.methods.lorc import LORC_WEIGHTS
        if self.lorc_weight not in LORC_WEIGHTS:
            raise UnsupportedError(f"unknown LoRC weighting {self.lorc_weight!r}; expected one "
                                   f"of {list(LORC_WEIGHTS)}")
        if self.lorc_weight != "none" and self.method not in CALIBRATED:
            raise UnsupportedError(f"--lorc-weight {self.lorc_weight} needs calibration inputs: "
                                   f"use a calibrated method ({', '.join(sorted(CALIBRATED))}), "
                                   f"not {self.method}")
        if self.lorc_weight != "none" and self.lorc_rank <= 0:
            raise UnsupportedError(f"--lorc-weight {self.lorc_weight} weights LoRC factors: "
                                   "add --lorc-rank R (R >= 1)")

    def _check_refit(self) -> None:
        if not isinstance(self.refit, int) or isinstance(self.refit, bool) or self.refit < 0:
            raise UnsupportedError(f"--refit expected a whole number of rounds >= 0 "
                                   f"(not {self.refit!r})")
        if self.refit and self.method not in ("gptq", "leanquant"):
            raise UnsupportedError(f"--refit re-fits the grids of gptq / leanquant from their "
                                   f"Hessians (not {self.method}"
                                   + ("; tesseraq tunes its scales itself)"
                                      if self.method == "tesseraq" else ")"))
        if not isinstance(self.cd, int) or isinstance(self.cd, bool) or self.cd < 0:
            raise UnsupportedError(f"--cd expected a whole number of passes >= 0 "
                                   f"(not {self.cd!r})")
        if self.cd and self.method not in ("gptq", "leanquant", "leanquant-nu"):
            raise UnsupportedError(f"--cd improves the codes of gptq / leanquant / leanquant-nu "
                                   f"on their Hessians (not {self.method})")
        if self.refit_sub and not self.refit:
            raise UnsupportedError("--refit-sub changes what --refit re-fits: add --refit N "
                                   "(N >= 1)")

    def _check_imatrix(self) -> None:
        """``imatrix``: None, a path (normalised to str) or "auto"; only with rtn."""
        if self.imatrix is None:
            return
        if not isinstance(self.imatrix, (str, os.PathLike)) or not os.fspath(self.imatrix):
            raise UnsupportedError(f"imatrix expected a llama-imatrix GGUF path or 'auto' "
                                   f"(not {self.imatrix!r})")
        self.imatrix = os.fspath(self.imatrix)
        if self.method != "rtn":
            raise UnsupportedError(f"--imatrix applies to --method rtn (llama.cpp's imatrix "
                                   f"quantizers), not {self.method}, which uses the full "
                                   "calibration activations")
        if self.imatrix == "auto" and not self.calib:
            raise UnsupportedError("--imatrix auto computes the importance matrix from "
                                   "calibration text: add --calib FILE")


def _rtn(name: str, W: np.ndarray, plan: TensorPlan, imatrix: np.ndarray | None) -> QTensor:
    spec = plan.spec
    if spec.name.startswith("gguf-"):
        # --method rtn on GGUF grids reproduces llama.cpp's own reference quantizers
        from qexport.backends.gguf.llamacpp_quants import llamacpp_quantize
        spec.check_shape(W.shape, name)
        codes, grid = llamacpp_quantize(W, spec.name[5:].upper(), imatrix, name=name)
        method = "llamacpp-rtn" + ("+imatrix" if imatrix is not None else "")
        return QTensor(name, codes, grid, spec, stats={"method": method})
    from qexport.methods.rtn import rtn_quantize
    return rtn_quantize(W, spec, name=name).to_qtensor(name)


def _check_finite(name: str, W: np.ndarray) -> None:
    bad = ~np.isfinite(W)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise NumericsError(f"{name}: expected finite weights (found {W[r, c]} at [{r}, {c}], "
                            f"{int(bad.sum())} non-finite in all)")


def _add_lorc(qt: QTensor, W: np.ndarray, rank: int, H: Any = None) -> None:
    """LoRC factors of ``W - dequant(qt)``; ``H`` (float ``[in, in]``): Hessian-weighted."""
    from qexport.methods.lorc import lorc_factors
    if H is not None and not isinstance(H, np.ndarray):
        H = H.detach().cpu().numpy()
    qt.residual = lorc_factors(W, qt.dequantize(with_residual=False), rank, H=H)


#: QuantizeOptions fields that only GPTQ / LeanQuant read (refused with tesseraq, not ignored)
_HESSIAN_ONLY = {"percdamp": (None, "--damp"), "percdamp_mlp": (None, "--damp-mlp"),
                 "p": (None, "--p"),
                 "act_order": (None, "--act-order"), "static_groups": (False, "--static-groups"),
                 "refit": (0, "--refit"), "refit_sub": (False, "--refit-sub"),
                 "cd": (0, "--cd")}   # --asym-calib: refused in check()


def _check_tesseraq_options(opts: QuantizeOptions) -> None:
    """``opts.tesseraq`` holds only TesseraQOptions fields, valid values, no GPTQ-only options."""
    from dataclasses import fields

    from qexport.methods.tesseraq import TesseraQOptions
    known = {f.name for f in fields(TesseraQOptions)} - {"progress"}
    bad = sorted(set(opts.tesseraq) - known)
    if bad:
        raise UnsupportedError(f"unknown tesseraq option {bad[0]!r}; expected one of "
                               f"{sorted(known)}")
    used = [cli for k, (off, cli) in _HESSIAN_ONLY.items() if getattr(opts, k) != off]
    if used:
        raise UnsupportedError(f"--method tesseraq does not use {used[0]} (a GPTQ / LeanQuant "
                               "option); leave it out")
    tq = _tesseraq_options(opts)
    tq.check()
    if tq.lorc != "after" and opts.lorc_rank <= 0:
        raise UnsupportedError(f"--tq-lorc {tq.lorc} places LoRC factors: add --lorc-rank R")
    if tq.lorc == "tune" and opts.lorc_weight != "none":
        raise UnsupportedError(f"--tq-lorc tune trains the factors on the block output; "
                               f"--lorc-weight {opts.lorc_weight} does not apply (leave it out)")


def _tesseraq_options(opts: QuantizeOptions) -> Any:
    """The :class:`TesseraQOptions` of a run: its defaults, overridden by ``opts.tesseraq``."""
    from qexport.methods.tesseraq import TesseraQOptions
    kw = dict(opts.tesseraq)
    if isinstance(kw.get("thresholds"), list):
        kw["thresholds"] = tuple(kw["thresholds"])
    return TesseraQOptions(**kw, progress=opts.progress)


class _FoldedSource:
    """``src`` whose :meth:`get` returns TesseraQ's AWQ-folded passthrough tensors (norm weights,
    v_proj biases: part of the quantized model) instead of the source's; all else delegated."""

    def __init__(self, src: Any, updates: dict[str, np.ndarray]) -> None:
        self._src, self._updates = src, updates

    def get(self, name: str) -> np.ndarray:
        if name in self._updates:
            return self._updates[name].copy()
        return self._src.get(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._src, attr)


def _quantize_tesseraq(src: Any, plan: dict[str, TensorPlan], opts: QuantizeOptions,
                       finish: Callable[[str, QTensor, np.ndarray], QTensor], checkpoint: Any
                       ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """TesseraQ (AWQ init + PAR + DST) of the planned decoder linears, block by block; each
    finished QTensor goes through ``finish`` with its LoRC reference: the FP weight after AWQ
    folding (what the QTensor approximates under the folded norms; original column order).

    Returns:
        (``src`` with the folded passthrough tensors, calibration info, provenance report
        ``{"options", "blocks"}`` without wall-clock entries).
    """
    if checkpoint is not None and getattr(checkpoint, "resume", False):
        raise UnsupportedError("--resume is not supported with --method tesseraq (its blocks "
                               "carry two activation chains and folded norms that are not "
                               "checkpointed); rerun without --resume")
    from qexport.calib import load_calibration
    from qexport.methods.tesseraq import tesseraq_quantize_model
    tq = _tesseraq_options(opts)
    samples, calib_info = load_calibration(opts.calib, src.tokenizer, n_samples=opts.n_samples,
                                           seq_len=opts.seq_len, seed=opts.seed,
                                           sampling=opts.calib_sampling)
    fp: dict[str, np.ndarray] = {}

    def block_done(i: int, qts: dict[str, QTensor]) -> None:
        for name, qt in qts.items():
            finish(name, qt, fp.pop(name))

    _, updates, report = tesseraq_quantize_model(src, plan, samples, tq,
                                                 on_block_done=block_done, fp_weights_out=fp,
                                                 keep_tensors=False, lorc_rank=opts.lorc_rank,
                                                 lorc_weight=opts.lorc_weight)
    blocks = [{k: v for k, v in b.items() if "seconds" not in str(k)}
              for b in report["blocks"]]
    return _FoldedSource(src, updates), calib_info, {"options": report["options"],
                                                     "blocks": blocks}


def _untimed(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without wall-clock entries (``seconds*``), so that the IR is deterministic."""
    return {k: v for k, v in stats.items() if not str(k).startswith("seconds")}


def quantize_model(src: Any, plan: dict[str, TensorPlan], opts: QuantizeOptions,
                   *, on_tensor: Callable[[str, QTensor], None] | None = None,
                   checkpoint: Any = None, sink: Any = None) -> QModel:
    """Quantize every tensor of ``plan`` (HF names) from ``src`` (a qexport.model SourceModel).

    ``checkpoint``: a :class:`qexport.checkpoint.Checkpoint`; calibrated methods then save every
    finished decoder layer to it and, when it holds an interrupted run with the same settings,
    restore the finished layers and continue from the next one (same result, same bytes).
    Wall-clock timings are left out of the IR (stats and provenance) to keep it deterministic.
    ``sink``: a :class:`qexport.irstream.IRStreamWriter`; every finished tensor is then written
    to disk at once and dropped (memory does not grow with depth), and the returned QModel reads
    its tensors from there.
    """
    opts.check()
    qm = _quantize(src, plan, opts, on_tensor, checkpoint, sink)
    if opts.e2e_epochs:
        from qexport.e2e_stage import run_e2e
        qm = run_e2e(qm, src, opts)
    return qm


def _quantize(src: Any, plan: dict[str, TensorPlan], opts: QuantizeOptions,
              on_tensor: Callable[[str, QTensor], None] | None, checkpoint: Any,
              sink: Any) -> QModel:
    """:func:`quantize_model` up to the optional ``--e2e`` stage."""
    n_layers = int(src.arch.n_layers)
    linears = [n for n in linear_names(n_layers) if n in plan]
    tensors: dict[str, QTensor] = {}
    calib_info: dict[str, Any] = {}

    def finish(name: str, qt: QTensor, W: np.ndarray, H: Any = None) -> QTensor:
        if opts.lorc_rank > 0 and qt.residual is None:     # tesseraq fits its own
            _add_lorc(qt, W, opts.lorc_rank, H if opts.lorc_weight == "hessian" else None)
        qt.stats = _untimed(qt.stats)
        tensors[name] = qt if sink is None else sink.add(qt)   # sink: a small stand-in
        if on_tensor is not None:
            on_tensor(name, qt)
        return qt

    method_prov: dict[str, Any] = {}          # method-specific provenance (tesseraq, imatrix)
    if opts.method == "tesseraq":
        src, calib_info, method_prov["tesseraq"] = _quantize_tesseraq(src, plan, opts, finish,
                                                                      checkpoint)
    elif opts.method in CALIBRATED:
        import torch

        from qexport.calib import load_calibration, quantize_layerwise
        from qexport.layer_quantizer import layer_quantizer as make_quantizer
        from qexport.layer_quantizer import percdamp
        layer_quantizer = make_quantizer(opts)
        samples, calib_info = load_calibration(opts.calib, src.tokenizer, n_samples=opts.n_samples,
                                               seq_len=opts.seq_len, seed=opts.seed,
                                               sampling=opts.calib_sampling)

        def quantize_fn(name: str, W: "torch.Tensor", H: "torch.Tensor") -> "torch.Tensor":
            if name not in plan:
                return W
            Wn = W.detach().cpu().numpy().astype(np.float32)
            _check_finite(name, Wn)
            res = layer_quantizer(Wn, H, plan[name].spec, name)
            qt = finish(name, res.to_qtensor(name), Wn, H)
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
                           start_layer=start, hidden=hidden, on_layer_state=on_state,
                           v_hessian=opts.v_hessian, offload=opts.offload_activations,
                           asym_damp=percdamp(opts) if opts.asym_calib else None)
    else:
        from tqdm import tqdm
        imatrix: dict[str, np.ndarray] = {}
        if opts.imatrix:
            from qexport.imatrix import check_imatrix, check_imatrix_plan, resolve_imatrix
            check_imatrix_plan(plan)
            imatrix, method_prov["imatrix"] = resolve_imatrix(
                src, opts.imatrix, calib=opts.calib, n_samples=opts.n_samples,
                seq_len=opts.seq_len, seed=opts.seed, sampling=opts.calib_sampling,
                progress=opts.progress)
            check_imatrix(imatrix, plan, src, opts.imatrix)
            calib_info = method_prov["imatrix"].get("calibration", {})
        todo = linears + [n for n in plan if n not in linears]   # + embeddings / lm_head
        for name in tqdm(todo, desc="rtn", disable=not opts.progress, unit="tensor"):
            W = src.get(name)
            _check_finite(name, W)
            finish(name, _rtn(name, W, plan[name], imatrix.get(name)), W)
    for name in plan:                                    # embeddings / lm_head etc.
        if name not in tensors:
            W = src.get(name)
            _check_finite(name, W)
            finish(name, _rtn(name, W, plan[name], None), W)
    # progress and offloading change how a run looks and where memory goes, not its result
    prov = {"method": opts.method, "options": {k: v for k, v in asdict(opts).items()
                                               if k not in ("progress", "offload_activations")},
            "calibration": calib_info, "source": getattr(src, "source", ""),
            "host": platform.machine()}
    prov.update(method_prov)
    recipe = {"tensors": {n: p.to_dict() for n, p in plan.items()}}
    if sink is not None:                # passthrough streamed too, one tensor at a time
        return sink.finish_model(src, tensors, config=dict(src.config),
                                 tokenizer=dict(src.tokenizer), recipe=recipe, provenance=prov)
    passthrough = {n: np.asarray(src.get(n), dtype=np.float32)
                   for n in src.tensor_names() if n not in tensors}
    return QModel(config=dict(src.config), tensors=tensors, passthrough=passthrough,
                  tokenizer=dict(src.tokenizer), recipe=recipe, provenance=prov)


def text_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
