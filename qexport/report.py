"""``qexport report IR -o DIR``: a human-readable account of one quantization run.

| file          | content                                                                   |
|---------------|---------------------------------------------------------------------------|
| ``report.md`` | method, recipe, options, calibration, totals, a per-layer and a per-tensor |
|               | table (bits per weight incl. scales/zeros/residual; error)                 |
| ``report.png``| per-layer error (top) and bits per weight (bottom)                          |

The error is the relative Frobenius error ``||W - Q||_F / ||W||_F`` of each quantized tensor
(``Q`` with its LoRC residual) when the source model is given (``--source``); per layer it is
``sqrt(sum ||W - Q||^2 / sum ||W||^2)`` over the layer's tensors. Without the source, the
method's own objective from the IR's stats is shown (GPTQ: ``sum (W-Q) H (W-Q)^T``), summed
per layer. The folder is written atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qexport.atomic import atomic_output
from qexport.errors import InputError
from qexport.ir import QModel

__all__ = ["tensor_rows", "layer_rows", "write_report", "build_report"]


def _layer_of(name: str) -> int:
    """Decoder layer index of an HF tensor name; -1 for embeddings / lm_head."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def tensor_rows(qm: QModel, source: Any = None, progress: bool = False) -> list[dict[str, Any]]:
    """One row per quantized tensor: name, layer, shape, spec, bpw, weights, bits, and either
    ``sq_err``/``sq_norm``/``rel_error`` (with ``source``, a SourceModel) or ``objective``."""
    from tqdm import tqdm
    rows = []
    for name in tqdm(sorted(qm.tensors, key=lambda n: (_layer_of(n), n)), desc="report",
                     unit="tensor", disable=not progress or source is None):
        qt = qm.tensors[name]
        bits = sum(qt.bits().values())
        row: dict[str, Any] = {"name": name, "layer": _layer_of(name), "shape": list(qt.shape),
                               "spec": qt.spec.name, "weights": int(qt.codes.size),
                               "bits": int(bits), "bpw": bits / qt.codes.size,
                               "objective": qt.stats.get("objective")}
        if source is not None:
            W = source.get(name).astype(np.float64)
            if W.shape != qt.shape:
                raise InputError(f"{name}: source shape {list(W.shape)} differs from the IR's "
                                 f"{list(qt.shape)} (expected the model the IR was made from)")
            d = W - qt.dequantize().astype(np.float64)
            row["sq_err"], row["sq_norm"] = float(np.sum(d * d)), float(np.sum(W * W))
            row["rel_error"] = float(np.sqrt(row["sq_err"] / max(row["sq_norm"], 1e-300)))
        rows.append(row)
    return rows


def layer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer totals of :func:`tensor_rows` (layer -1: embeddings / lm_head)."""
    out = []
    for layer in sorted({r["layer"] for r in rows}):
        rs = [r for r in rows if r["layer"] == layer]
        w, b = sum(r["weights"] for r in rs), sum(r["bits"] for r in rs)
        row: dict[str, Any] = {"layer": layer, "tensors": len(rs), "weights": w, "bpw": b / w}
        if all("sq_err" in r for r in rs):
            row["rel_error"] = float(np.sqrt(sum(r["sq_err"] for r in rs)
                                             / max(sum(r["sq_norm"] for r in rs), 1e-300)))
        objs = [r["objective"] for r in rs if isinstance(r.get("objective"), (int, float))]
        row["objective"] = float(sum(objs)) if len(objs) == len(rs) else None
        out.append(row)
    return out


def build_report(ir: str | os.PathLike, source: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Everything ``report.md`` shows, as a JSON-serialisable dict."""
    from qexport.irio import load_ir
    qm = load_ir(ir)
    src = None
    if source is not None:
        from qexport.model.load import load_model
        src = load_model(source)
    rows = tensor_rows(qm, src, progress)
    prov = qm.provenance
    return {"ir": str(ir), "architecture": qm.architecture, "method": prov.get("method"),
            "recipe": qm.recipe.get("name"), "options": prov.get("options", {}),
            "calibration": prov.get("calibration", {}), "source": source or prov.get("source"),
            "error_kind": "rel_error" if src is not None else "objective",
            "totals": qm.bits_summary(), "passthrough": len(qm.passthrough),
            "layers": layer_rows(rows), "tensors": rows}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(rep: dict[str, Any]) -> str:
    err = rep["error_kind"]
    err_title = "rel. error ‖W−Q‖/‖W‖" if err == "rel_error" else "objective (method stats)"
    t = rep["totals"]
    lines = [f"# qexport report: {Path(rep['ir']).name}", "",
             f"- architecture: {rep['architecture']}", f"- method: {rep['method']}",
             f"- recipe: {rep['recipe']}", f"- source: {rep['source']}",
             f"- quantized weights: {t['weights']:,}, {t['bpw']:.4f} bits per weight "
             "(codes + scales/zeros + residual factors)",
             f"- passthrough tensors: {rep['passthrough']}", "", "## Settings", "",
             "| option | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(rep["options"].items())]
    lines += ["", "## Calibration", ""]
    cal = rep["calibration"] or {}
    lines += ([f"- {k}: {_fmt(v)}" for k, v in sorted(cal.items())] or ["- none (no calibration)"])
    lines += ["", "## Per layer", "", "![per-layer error and bits per weight](report.png)", "",
              f"| layer | tensors | weights | bpw | {err_title} |", "|---:|---:|---:|---:|---:|"]
    for r in rep["layers"]:
        name = "embed/head" if r["layer"] < 0 else str(r["layer"])
        lines.append(f"| {name} | {r['tensors']} | {r['weights']:,} | {r['bpw']:.4f} | "
                     f"{_fmt(r.get(err))} |")
    lines += ["", "## Per tensor", "", f"| tensor | shape | grid | bpw | {err_title} |",
              "|---|---|---|---:|---:|"]
    for r in rep["tensors"]:
        lines.append(f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['spec']} | "
                     f"{r['bpw']:.4f} | {_fmt(r.get(err))} |")
    return "\n".join(lines) + "\n"


def _plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    layers = [r for r in rep["layers"] if r["layer"] >= 0]
    x = [r["layer"] for r in layers]
    err = rep["error_kind"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax1.plot(x, [np.nan if r.get(err) is None else r[err] for r in layers], marker="o")
    ax1.set_ylabel("rel. error" if err == "rel_error" else "objective")
    ax1.set_title(f"{rep['method']} / {rep['recipe']}")
    ax2.bar(x, [r["bpw"] for r in layers])
    ax2.set_ylabel("bits per weight")
    ax2.set_xlabel("decoder layer")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_report(ir: str | os.PathLike, out_dir: str | os.PathLike, *, source: str | None = None,
                 force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write ``report.md``, ``report.png`` and ``report.json`` to ``out_dir``; return the dict."""
    rep = build_report(ir, source, progress)
    with atomic_output(out_dir, is_dir=True, force=force) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "report.md").write_text(_markdown(rep), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
        _plot(rep, tmp / "report.png")
    return rep
