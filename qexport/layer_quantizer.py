"""The per-linear quantizer of the layer-wise calibrated methods (gptq, leanquant,
leanquant-nu): ``(W [out, in] fp32, H [in, in], spec, name) -> QuantResult``, with the
method's defaults (dampening, act-order) and optional scale re-fit rounds."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["DEFAULT_PERCDAMP", "DEFAULT_ACT_ORDER", "act_order", "percdamp", "layer_quantizer"]

#: Hessian dampening (fraction of mean diag H) when --damp is not given: the reference codes'
DEFAULT_PERCDAMP = {"gptq": 0.01, "leanquant": 0.1, "leanquant-nu": 0.1}


def percdamp(opts: Any, name: str = "") -> float:
    """The dampening of tensor ``name``: ``--damp-mlp`` for gate/up/down when given, else
    ``--damp`` when given, else the method's :data:`DEFAULT_PERCDAMP`."""
    if getattr(opts, "percdamp_mlp", None) is not None and ".mlp." in name:
        return opts.percdamp_mlp
    return opts.percdamp if opts.percdamp is not None else DEFAULT_PERCDAMP[opts.method]


#: act-order when --act-order/--no-act-order is not given. gptq: on (measured better on the
#: sample model, README Results); leanquant: off as in session-1 measurements (not re-measured).
DEFAULT_ACT_ORDER = {"gptq": True, "leanquant": False}


def act_order(opts: Any) -> bool:
    """``--act-order`` as given, else :data:`DEFAULT_ACT_ORDER`. With groups, act-order uses
    static groups, so the stored codes keep the original column order and runtimes never see a
    g_idx."""
    if opts.act_order is None:
        return DEFAULT_ACT_ORDER.get(opts.method, False)
    return bool(opts.act_order)


def layer_quantizer(opts: Any) -> Callable[..., Any]:
    """``(W, H, spec, name) -> QuantResult`` for the calibrated method of ``opts``, followed by
    ``opts.refit`` rounds of :func:`qexport.methods.refit.refit_rounds` (``opts.cd``
    coordinate-descent passes over the codes in each round, or alone without ``--refit``;
    their ridge is the tensor's damp)."""
    def quantize(W: Any, H: Any, spec: Any, name: str) -> Any:
        damp = percdamp(opts, name)
        res = _method_quantizer(opts, damp)(W, H, spec, name)
        cd = int(getattr(opts, "cd", 0) or 0)
        if not opts.refit and not cd:
            return res
        from qexport.methods.refit import refit_rounds
        from qexport.methods.result import QuantResult
        Hn = H.detach().cpu().numpy() if hasattr(H, "detach") else np.asarray(H)
        Wn = np.asarray(W, dtype=np.float32)
        if not opts.refit:
            from qexport.grids import dequantize
            from qexport.methods.cd import cd_codes
            from qexport.methods.result import hessian_objective
            codes, st = cd_codes(Wn, Hn, res.codes, res.grid, spec, cd, percdamp=damp)
            obj = hessian_objective(Wn, dequantize(codes, res.grid, spec), Hn)
            return QuantResult(codes=codes, grid=res.grid, spec=spec,
                               stats={**res.stats, "cd": cd, **st, "objective": obj})
        codes, grid, st = refit_rounds(Wn, Hn, res.codes, res.grid,
                                       spec, opts.refit, name=name, percdamp=damp,
                                       blocksize=opts.blocksize, actorder=act_order(opts),
                                       sub=bool(getattr(opts, "refit_sub", False)),
                                       cd=cd, cd_damp=damp)
        return QuantResult(codes=codes, grid=grid, spec=spec, stats={**res.stats, **st})
    return quantize


def _method_quantizer(opts: Any, damp: float) -> Callable[..., Any]:
    """``(W, H, spec, name) -> QuantResult`` of the method alone (``damp``: its percdamp)."""
    common = {"blocksize": opts.blocksize, "percdamp": damp}
    if opts.method == "gptq":
        from qexport.methods.gptq import gptq_quantize
        return lambda W, H, spec, name: gptq_quantize(
            W, H, spec, name=name, actorder=act_order(opts), static_groups=opts.static_groups,
            **common)
    from qexport.methods.leanquant import leanquant_aff_quantize, leanquant_nu_quantize
    if opts.method == "leanquant":
        return lambda W, H, spec, name: leanquant_aff_quantize(
            W, H, spec, name=name, p=2.0 if opts.p is None else opts.p,
            actorder=act_order(opts), static_groups=opts.static_groups, **common)
    # LeanQuant-nu: act-order is the reference default and codebooks are static per row
    return lambda W, H, spec, name: leanquant_nu_quantize(
        W, H, spec, name=name, p=4.0 if opts.p is None else opts.p, actorder=True,
        seed=opts.seed, **common)
