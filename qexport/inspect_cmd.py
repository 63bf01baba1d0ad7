"""``qexport inspect``: per-tensor format, shape and bits per weight, for IR folders and GGUF."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qexport.errors import InputError

__all__ = ["ir_rows", "inspect_path"]


def ir_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (name, format, shape, bpw incl. scales/zeros/residual, note) and totals of an IR."""
    from qexport.irio import load_ir
    from qexport.specs import describe
    qm = load_ir(path)
    plan = qm.recipe.get("tensors")
    notes = {n: str(v.get("reason", "")) for n, v in plan.items()
             if isinstance(v, dict)} if isinstance(plan, dict) else {}
    rows = []
    for name in sorted(qm.tensors, key=_layer_key):
        qt = qm.tensors[name]
        b = qt.bits()
        fmt = describe(qt.spec) + (f" + LoRC r{qt.residual.rank}" if qt.residual else "")
        rows.append({"name": name, "format": fmt, "shape": list(qt.shape),
                     "bpw": round(sum(b.values()) / qt.codes.size, 4),
                     "bits": b, "note": notes.get(name, "")})
    for name in sorted(qm.passthrough, key=_layer_key):
        arr = qm.passthrough[name]
        rows.append({"name": name, "format": "F32 (passthrough)", "shape": list(arr.shape),
                     "bpw": 32.0, "note": ""})
    s = qm.bits_summary()
    mix: dict[str, int] = {}
    for r in rows:
        if r["bpw"] != 32.0:
            mix[r["format"]] = mix.get(r["format"], 0) + 1
    totals = {"kind": "ir", "architecture": qm.architecture, "method": qm.provenance.get("method"),
              "quantized_tensors": len(qm.tensors), "quantized_weights": s["weights"],
              "bpw_quantized": round(s["bpw"], 4), "mix": mix}
    return rows, totals


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "blk") and parts[i + 1].isdigit():
            return int(parts[i + 1]), name
    return -1, name


def gguf_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from qexport.backends.gguf.reader import read_gguf_summary
    rows, meta = read_gguf_summary(path)
    rows = [r if isinstance(r, dict) else dict(r._asdict()) for r in rows]
    n = sum(_numel(r["shape"]) for r in rows)
    bits = sum(8 * r["bytes"] for r in rows)
    mix: dict[str, int] = {}
    for r in rows:
        mix[r["type"]] = mix.get(r["type"], 0) + 1
    totals = {"kind": "gguf", "architecture": meta.get("general.architecture"),
              "file_type": meta.get("general.file_type"), "tensors": len(rows),
              "weights": n, "bpw_all_tensors": round(bits / n, 4) if n else 0, "mix": mix}
    return rows, totals


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def inspect_path(path: Path, as_json: bool) -> None:
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise InputError(f"{path}: not an IR folder (no manifest.json)")
        rows, totals = ir_rows(path)
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"{path}: expected a GGUF file (magic b'GGUF', found {magic!r}) "
                             "or an IR folder")
        rows, totals = gguf_rows(path)
    if as_json:
        click.echo(json.dumps({"tensors": rows, "totals": totals}, indent=1, default=str))
        return
    w = max([len(r["name"]) for r in rows] + [4])
    fw = max([len(str(r.get("format", r.get("type", "")))) for r in rows] + [6])
    click.echo(f"{'name':<{w}}  {'format':<{fw}}  {'shape':<14} {'bpw':>7}  note")
    for r in rows:
        fmt = r.get("format", r.get("type", ""))
        shape = "x".join(str(s) for s in r["shape"])
        click.echo(f"{r['name']:<{w}}  {fmt:<{fw}}  {shape:<14} {r['bpw']:>7.3f}  {r.get('note', '')}")
    click.echo("")
    for k, v in totals.items():
        click.echo(f"{k}: {v}")
