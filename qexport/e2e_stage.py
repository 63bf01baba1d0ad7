"""The ``--e2e N`` stage of ``quantize`` / ``convert``: after the method has fixed every code,
train the grids' float parameters and the RMSNorm weights end to end against the
full-precision model (:mod:`qexport.methods.e2e`), on the run's own calibration windows.

The stage takes the finished QModel (in memory or streamed to disk), and returns one whose
tensors have the same codes and integer fields with the tuned floats (fp16-rounded, so every
target holds them exactly), the tuned norms in its passthrough, and the tuning recorded in its
provenance under ``e2e`` (options, per-epoch KL, held-out KL).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qexport.errors import UnsupportedError
from qexport.ir import QModel

__all__ = ["e2e_options", "check_e2e", "run_e2e", "E2E_FIELDS"]

#: E2EOptions fields a run may override (``QuantizeOptions.e2e_options``)
E2E_FIELDS = ("lr", "batch", "train_len", "granularity", "holdout", "norms")


def e2e_options(epochs: int, overrides: dict[str, Any], progress: bool) -> Any:
    """The :class:`qexport.methods.e2e.E2EOptions` of a run (checked)."""
    from qexport.methods.e2e import E2EOptions
    bad = sorted(set(overrides) - set(E2E_FIELDS))
    if bad:
        raise UnsupportedError(f"unknown e2e option {bad[0]!r}; expected one of "
                               f"{list(E2E_FIELDS)}")
    o = E2EOptions(epochs=epochs, progress=progress, **overrides)
    o.check()
    return o


def check_e2e(opts: Any) -> None:
    """Refuse what ``--e2e`` cannot do, before any work (``opts``: QuantizeOptions)."""
    epochs = opts.e2e_epochs
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise UnsupportedError(f"--e2e expected a whole number of epochs >= 0 (not {epochs!r})")
    if not epochs:
        if opts.e2e_options:
            given = ", ".join(f"--e2e-{k.replace('_', '-')}" for k in sorted(opts.e2e_options))
            raise UnsupportedError(f"{given}: end-to-end tuning options, expected with --e2e N "
                                   f"(N >= 1 epochs)")
        return
    if not opts.calib:
        raise UnsupportedError("--e2e trains against the full-precision model on calibration "
                               "text: add --calib FILE")
    if opts.method == "leanquant-nu":
        raise UnsupportedError("--e2e trains affine, super-block and fixed-table grids; "
                               "leanquant-nu's free codebooks are not trained (leave --e2e out)")
    if opts.asym_calib:
        raise UnsupportedError("--e2e with --asym-calib is not supported (leave one out)")
    e2e_options(epochs, dict(opts.e2e_options), False)


def run_e2e(qm: QModel, teacher: Any, opts: Any) -> QModel:
    """Tune ``qm`` (codes final) against ``teacher`` (the source model, full precision).

    Args:
        qm: the method's QModel; its passthrough holds the quantized model's norms and biases
            (TesseraQ's AWQ-folded ones included). A streamed model is read into memory.
        teacher: the SourceModel the run quantized.
        opts: the run's QuantizeOptions (calibration settings, ``e2e_epochs``,
            ``e2e_options``).
    Returns:
        A QModel held in memory: tuned tensors, tuned norms, ``provenance["e2e"]``.
    """
    from qexport.calib import load_calibration
    from qexport.methods.e2e import e2e_tune
    from qexport.pipeline import _FoldedSource
    eo = e2e_options(opts.e2e_epochs, dict(opts.e2e_options), opts.progress)
    samples, info = load_calibration(opts.calib, teacher.tokenizer, n_samples=opts.n_samples,
                                     seq_len=opts.seq_len, seed=opts.seed,
                                     sampling=opts.calib_sampling)
    tensors = {n: qm.tensors[n] for n in qm.tensors}          # read a streamed model once
    passthrough = {n: np.asarray(qm.passthrough[n], dtype=np.float32) for n in qm.passthrough}
    new, norms, report = e2e_tune(teacher, _FoldedSource(teacher, passthrough), tensors,
                                  samples, eo)
    passthrough.update(norms)
    prov = dict(qm.provenance)
    prov["e2e"] = {**report, "calibration": info}
    return QModel(config=dict(qm.config), tensors=new, passthrough=passthrough,
                  tokenizer=dict(qm.tokenizer), recipe=dict(qm.recipe), provenance=prov)
