"""IR cache of the benchmarks: a method's IR kept on disk under a hash of its settings, so that
a variant which only adds a later stage (``--e2e N``) starts from the IR its base variant built
instead of quantizing the model again.

``cached_ir(folder, tag, src, plan, opts)``: ``opts`` without its e2e stage is the base; its IR
is ``folder/ir/<tag>-<sha256 of the base settings, 16 hex>.qir``, built with
:func:`qexport.pipeline.quantize_model` when absent (and saved), loaded otherwise; then the e2e
stage, when ``opts`` asks for it, runs on it (:func:`qexport.e2e_stage.run_e2e`). The result is
what ``quantize_model(src, plan, opts)`` gives, because the e2e stage reads only the finished
IR, the source model and the calibration settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["cached_ir", "base_key", "adopt_ir"]

#: options that may differ between an adopted IR and the bench's run (same result)
_SAME_RESULT = ("progress", "offload_activations", "calib", "e2e_epochs", "e2e_options")


def base_key(plan: dict[str, Any], opts: Any) -> str:
    """sha256 (16 hex) of everything that decides the base IR: the options (less progress
    and the e2e stage) and each tensor's planned grid."""
    o = {k: v for k, v in dataclasses.asdict(opts).items()
         if k not in ("progress", "e2e_epochs", "e2e_options")}
    p = {n: tp.spec.name for n, tp in sorted(plan.items())}
    blob = json.dumps({"options": o, "plan": p}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_ir(folder: Path, tag: str, src: Any, plan: dict[str, Any], opts: Any) -> Any:
    """The QModel of ``opts`` on ``plan``, its base IR from / into ``folder/ir``."""
    from qexport.irio import load_ir, save_ir
    from qexport.pipeline import quantize_model
    path = folder / "ir" / f"{tag}-{base_key(plan, opts)}.qir"
    base = dataclasses.replace(opts, e2e_epochs=0, e2e_options={})
    if path.is_dir():
        qm = load_ir(path)
    else:
        qm = quantize_model(src, plan, base)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_ir(qm, path)
    if opts.e2e_epochs:
        from qexport.e2e_stage import run_e2e
        qm = run_e2e(qm, src, opts)
    return qm


def adopt_ir(folder: Path, tag: str, plan: dict[str, Any], opts: Any, ir: Path) -> Path:
    """Copy the IR folder ``ir`` (e.g. from ``qexport quantize``) to the cache path of
    ``opts``'s base IR, after checking that it was made with the same options (the calibration
    file compared by name; its windows' hash is in the IR) and holds ``plan``'s grids.

    Raises:
        SystemExit: naming the first option or tensor that differs (expected vs found).
    """
    import shutil

    from qexport.atomic import atomic_output
    from qexport.irio import load_ir
    qm = load_ir(ir, lazy=True)
    got = qm.provenance.get("options", {})
    want = dataclasses.asdict(opts)
    for k, v in want.items():
        if k not in _SAME_RESULT and got.get(k) != v:
            raise SystemExit(f"{ir}: option {k} expected {v!r} (found {got.get(k)!r})")
    if Path(str(got.get("calib"))).name != Path(str(opts.calib)).name:
        raise SystemExit(f"{ir}: calibration expected {Path(opts.calib).name} (found "
                         f"{got.get('calib')})")
    if got.get("e2e_epochs"):
        raise SystemExit(f"{ir}: expected an IR without the e2e stage (found e2e_epochs "
                         f"{got['e2e_epochs']})")
    rec = qm.recipe.get("tensors", {})
    for n, tp in sorted(plan.items()):
        found = (rec.get(n) or {}).get("spec")
        if found != tp.spec.name:
            raise SystemExit(f"{ir}: tensor {n} expected grid {tp.spec.name} (found {found})")
    dst = folder / "ir" / f"{tag}-{base_key(plan, opts)}.qir"
    if not dst.is_dir():
        with atomic_output(dst, is_dir=True) as tmp:
            shutil.copytree(ir, tmp, dirs_exist_ok=True)
    return dst
