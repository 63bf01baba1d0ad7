"""Helpers of tools/bench_gguf.py: GGUF file statistics, byte comparison of two GGUF files,
llama-perplexity output parsing, and the markdown table / plot of the results.

Result records (``results.json`` values; the committed ``docs/bench/gguf.json`` holds the same
entries, plus ``quick_cmp``: the ``--quick`` run's ``cmp|...`` entries) used here:

| key                 | fields                                                            |
|---------------------|-------------------------------------------------------------------|
| ``ppl|<file key>``  | ``ppl``, ``ppl_err``, ``chunks``, ``seconds``                     |
| ``build|<file key>``| ``path``, ``bytes``, ``bpw``, ``types`` (ggml type -> count)     |
| ``cmp|<a>|<b>``     | see :func:`compare_gguf`                                          |
| ``alias|<file key>``| the file key whose PPL it reuses (a string; same tensor bytes)    |

File keys: ``f32``, ``<method>|<TYPE>`` with method in :data:`METHOD_LABELS`.
"""
from __future__ import annotations

import filecmp
import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QEXPORT_METHODS", "METHOD_LABELS", "gguf_stats", "compare_gguf", "imatrix_agreement",
           "parse_ppl", "results_table", "table_markdown", "repro_table", "plot_results", "NOTES",
           "imatrix_lines", "types_lines", "target_lines"]

from bench_gguf_variants import QEXPORT_METHODS  # noqa: E402  (re-exported)

# every file key's method -> label (reference files first, then qexport's)
METHOD_LABELS = {
    "lq": "llama-quantize",
    "lqi": "llama-quantize + imatrix",
    "rtn": "qexport rtn",
    "rtn-llimat": "qexport rtn + llama-imatrix file",
    "rtn-imat": "qexport rtn + qexport imatrix",
    "lqq": "llama-quantize + qexport imatrix",
    **{m: v[2] for m, v in QEXPORT_METHODS.items()},
}
TABLE_METHODS = ("lq", "lqi", "rtn", "rtn-imat", *QEXPORT_METHODS)
#: the plot leaves out qexport rtn (its files are llama-quantize's, byte for byte)
PLOT_METHODS = tuple(m for m in TABLE_METHODS if m != "rtn")
OPTIONAL_METHODS = tuple(m for m, v in QEXPORT_METHODS.items() if v[3])
_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


#: the report's "How to read this" section
NOTES = """\
## How to read this

- Model: SmolLM2-135M-Instruct (`sample:smollm2`), 30 layers, hidden 576, intermediate 1536,
  tied embeddings. Its weights are the dequantized Q4_1 values of the shipped GGUF, so "F32" is
  that dequantized model written by qexport (`lower_gguf` of an IR without quantized tensors).
- Hidden 576 is not a multiple of 256: llama.cpp's row-length fallback turns every k-quant on
  q/k/v/o/gate/up into a 32-block type (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0); only ffn_down (1536 columns) keeps its k-quant. The tied token_embd/output is
  Q8_0 in every file. So "Q2_K" here is mostly Q4_0 and the k-quant rows mostly measure the
  legacy 32-block types (the ggml type counts of each file are in `gguf.json`).
- bits/weight: stored bits of every 2-D tensor (weights, scales, mins; token_embd included)
  over its element count. File size is the whole `.gguf`.
- Perplexity: `llama-perplexity -f wiki.test.raw -c 512 -b 512 -t 2` (second half of each
  window, llama.cpp's convention); ± is llama-perplexity's own estimate.
- llama-quantize + imatrix: imatrix from `llama-imatrix -f c4.utf8 -c 512 -b 512 --chunks N`
  on the F32 file (N = the number of qexport calibration windows). qexport gptq: 
  N x 512-token seeded windows (seed 0) of the same c4.utf8, qexport's gptq defaults (damp
  0.01, block 128, act-order with static groups, attention-weighted v_proj Hessian), min-max
  grids (`qexport.methods.gptq`); like `qexport convert --method gptq` it uses llama.cpp's
  *with-imatrix* recipe (for Q4_0: ffn_down of layers 0-2 in Q4_1; for IQ4_NL: no Q5_K
  ffn_down), so its tensor types and size equal llama-quantize + imatrix.
- qexport rtn (CLI `qexport convert --method rtn`) re-implements llama.cpp's quantizers;
  "qexport rtn + qexport imatrix" uses `qexport.imatrix.compute_imatrix` (mean x^2 per input
  column from the same calibration windows as gptq). The reproduction table checks them byte
  for byte against llama-quantize. Whole-file `cmp` differs only by layout (llama-quantize
  writes `general.file_type`/`general.quantization_version` last and orders tensors by its
  weight-name comparer, output_norm first) plus its `quantize.imatrix.*` keys.
- ratio column: (qexport ΔPPL) / (llama-quantize + imatrix ΔPPL), ΔPPL against F32. The issue's
  target is ratio <= 0.5 for qexport (its best method) at every type.
"""


def _reader(path: str | Path) -> Any:
    import gguf
    return gguf.GGUFReader(str(path), "r")


def gguf_stats(path: str | Path) -> dict[str, Any]:
    """File size, bits per weight of the 2-D tensors (every stored byte of the weights, scales
    and mins included; token_embd included) and ggml type -> number of tensors."""
    r = _reader(path)
    bits = elems = 0
    types: dict[str, int] = {}
    for t in r.tensors:
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        if len([d for d in t.shape if d > 1]) >= 2:
            bits += int(t.n_bytes) * 8
            elems += int(t.n_elements)
    return {"bytes": Path(path).stat().st_size, "bpw": bits / max(elems, 1),
            "types": dict(sorted(types.items()))}


def compare_gguf(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Compare two GGUF files: whole file (``cmp``) and tensor by tensor (name, ggml type,
    shape, raw data bytes). ``tensors_identical`` means every tensor's bytes are equal (the
    files may still differ in metadata, e.g. llama-quantize's ``quantize.imatrix.*`` keys)."""
    ra, rb = _reader(a), _reader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    differ: list[str] = []
    diff_bytes = total = 0
    for name in sorted(set(ta) | set(tb)):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None or x.tensor_type != y.tensor_type \
                or list(x.shape) != list(y.shape):
            differ.append(name)
            continue
        da = np.asarray(x.data).view(np.uint8).reshape(-1)
        db = np.asarray(y.data).view(np.uint8).reshape(-1)
        total += da.size
        if da.size != db.size or not np.array_equal(da, db):
            differ.append(name)
            if da.size == db.size:
                diff_bytes += int(np.count_nonzero(da != db))
    keys_a = [k for k in ra.fields if not k.startswith("GGUF.")]
    keys_b = [k for k in rb.fields if not k.startswith("GGUF.")]
    both = [k for k in keys_a if k in set(keys_b)]
    kv_differ = [k for k in both if ra.fields[k].contents() != rb.fields[k].contents()]
    return {"file_identical": filecmp.cmp(a, b, shallow=False), "tensors": len(ta),
            "tensors_identical": not differ, "tensors_differ": len(differ),
            "first_differ": differ[:5], "bytes_differ": diff_bytes, "bytes_compared": total,
            "keys_only_in_a": sorted(set(keys_a) - set(keys_b)),
            "keys_only_in_b": sorted(set(keys_b) - set(keys_a)), "kv_values_differ": kv_differ,
            "kv_order_same": both == [k for k in keys_b if k in set(keys_a)],
            "tensor_order_same": [t.name for t in ra.tensors] == [t.name for t in rb.tensors]}


def imatrix_agreement(a: str | Path, b: str | Path) -> dict[str, Any]:
    """How alike two imatrix files are: per tensor, the cosine similarity of the two vectors
    and the spread of their ratio (max/min of ``a_j / b_j`` after scaling to equal means)."""
    from qexport.imatrix import load_imatrix_gguf
    ia, _ = load_imatrix_gguf(a)
    ib, _ = load_imatrix_gguf(b)
    cos, p95 = [], []
    for name in sorted(set(ia) & set(ib)):
        x, y = ia[name].astype(np.float64), ib[name].astype(np.float64)
        cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
        r = (x / x.mean()) / np.maximum(y / y.mean(), 1e-30)
        p95.append(float(np.percentile(np.abs(np.log(r)), 95)))
    return {"tensors": len(cos), "cos_min": min(cos), "cos_median": float(np.median(cos)),
            "abs_log_ratio_p95_median": float(np.median(p95)),
            "only_in_a": len(set(ia) - set(ib)), "only_in_b": len(set(ib) - set(ia))}


def parse_ppl(log_text: str) -> tuple[float, float] | None:
    """``(PPL, +/-)`` from llama-perplexity's "Final estimate" line, or None."""
    m = _PPL_RE.search(log_text)
    return (float(m.group(1)), float(m.group(2))) if m else None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _ppl_of(results: dict[str, Any], key: str) -> tuple[float, float, str] | None:
    """(ppl, err, note): a file whose tensors are byte-identical to its reference reuses the
    reference's measurement (note "= llama-quantize")."""
    p = results.get(f"ppl|{key}")
    if p and "ppl" in p:
        return p["ppl"], p["ppl_err"], ""
    alias = results.get(f"alias|{key}")
    if alias:
        q = results.get(f"ppl|{alias}")
        if q and "ppl" in q:
            return q["ppl"], q["ppl_err"], f"= {METHOD_LABELS[alias.split('|')[0]]} (same bytes)"
    return None


def results_table(results: dict[str, Any], types: list[str]) -> list[dict[str, Any]]:
    """Rows ``{type, method, MiB, bpw, ppl, err, dppl, ratio, note}`` (missing = None)."""
    f32 = _ppl_of(results, "f32")
    rows = []
    for t in types:
        ref = _ppl_of(results, f"lqi|{t}")
        for m in TABLE_METHODS:
            key = f"{m}|{t}"
            b = results.get(f"build|{key}")
            b = None if b and "error" in b else b           # a failed build: as not run
            if b is None and m in OPTIONAL_METHODS:
                continue
            p = _ppl_of(results, key)
            d = p[0] - f32[0] if p and f32 else None
            dref = ref[0] - f32[0] if ref and f32 else None
            ratio = d / dref if d is not None and dref and m not in ("lq", "lqi") else None
            rows.append({"type": t, "method": METHOD_LABELS[m], "key": key,
                         "MiB": b["bytes"] / 2**20 if b else None,
                         "bpw": b["bpw"] if b else None, "ppl": p[0] if p else None,
                         "err": p[1] if p else None, "dppl": d, "ratio": ratio,
                         "note": p[2] if p else ("not run" if not b else "PPL not run")})
    return rows


def _yn(v: Any) -> str:
    return "?" if v is None else ("yes" if v else "no")


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table_markdown(results: dict[str, Any], types: list[str]) -> str:
    f32 = _ppl_of(results, "f32")
    fb = results.get("build|f32")
    out = ["| type | method | file MiB | bits/weight | PPL | ΔPPL vs F32 | "
           "ΔPPL / ΔPPL(llama-quantize+imatrix) | note |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    if fb and "error" not in fb:
        out.append(f"| F32 | reference (dequantized Q4_1 weights) | {_mib(fb['bytes'])} | "
                   f"{fb['bpw']:.3f} | {_fmt(f32 and f32[0], '.4f')} ± "
                   f"{_fmt(f32 and f32[1], '.4f')} | – | – | |")
    for r in results_table(results, types):
        ppl = "–" if r["ppl"] is None else f"{r['ppl']:.4f} ± {r['err']:.4f}"
        out.append(f"| {r['type']} | {r['method']} | {_fmt(r['MiB'], '.1f')} | "
                   f"{_fmt(r['bpw'], '.3f')} | {ppl} | {_fmt(r['dppl'], '+.4f')} | "
                   f"{_fmt(r['ratio'], '.2f')} | {r['note']} |")
    return "\n".join(out) + "\n"


def repro_table(results: dict[str, Any], types: list[str]) -> str:
    """Markdown: byte comparison of qexport's RTN files with llama-quantize's."""
    pairs = [("rtn", "lq"), ("rtn-llimat", "lqi"), ("rtn-imat", "lqq")]
    out = ["| type | qexport file | llama-quantize file | cmp (whole file) | tensors identical "
           "| differing tensors / bytes | shared metadata values | same KV / tensor order "
           "| metadata keys only in llama-quantize's |",
           "|---|---|---|---|---|---|---|---|---|"]
    for t in types:
        for a, b in pairs:
            c = results.get(f"cmp|{a}|{b}|{t}")
            if not c:
                continue
            extra = ", ".join(c["keys_only_in_b"]) or "–"
            out.append(f"| {t} | {METHOD_LABELS[a]} | {METHOD_LABELS[b]} | "
                       f"{'identical' if c['file_identical'] else 'differ'} | "
                       f"{'yes' if c['tensors_identical'] else 'NO'} ({c['tensors']}) | "
                       f"{c['tensors_differ']} / {c['bytes_differ']} of {c['bytes_compared']} | "
                       f"{'equal' if not c.get('kv_values_differ') else c['kv_values_differ']} | "
                       f"{_yn(c.get('kv_order_same'))} / {_yn(c.get('tensor_order_same'))} | "
                       f"{extra} |")
    return "\n".join(out) + "\n"


def plot_results(results: dict[str, Any], types: list[str], path: str | Path,
                 title: str) -> None:
    """PPL vs file size (MiB), one series per method, F32 as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results_table(results, types) if r["ppl"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(PLOT_METHODS, itertools.cycle("osD^vPXh<>*pH8d12348|_x+")))
    for m in PLOT_METHODS:
        pts = sorted((r["MiB"], r["ppl"], r["type"]) for r in rows
                     if r["key"].startswith(f"{m}|"))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[m], label=METHOD_LABELS[m])
        if m == "lqi":
            for x, y, t in pts:
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    f32 = _ppl_of(results, "f32")
    if f32:
        ax.axhline(f32[0], color="gray", ls="--", lw=1, label=f"F32 ({f32[0]:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("wikitext-2 PPL (llama-perplexity, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def imatrix_lines(r: dict[str, Any]) -> list[str]:
    """Markdown: the ``imatrix|agreement`` paragraph (none when not measured)."""
    a = r.get("imatrix|agreement")
    if not a or "error" in a:
        return []
    return ["## qexport imatrix vs llama-imatrix", "",
            f"Over {a['tensors']} linears: cosine similarity median {a['cos_median']:.5f}, "
            f"min {a['cos_min']:.5f}; median over tensors of the 95th percentile of "
            f"|log(ratio)| of mean-normalized entries {a['abs_log_ratio_p95_median']:.3f} "
            "(qexport: seeded random windows; llama-imatrix: consecutive chunks).", ""]


def types_lines(r: dict[str, Any], types: list[str]) -> list[str]:
    """Markdown: ggml type counts of the llama-quantize files without / with imatrix."""
    out = ["## ggml tensor types per file", "", "| type | llama-quantize | + imatrix "
           "(= qexport gptq / rtn + imatrix) |", "|---|---|---|"]
    for t in types:
        cells = []
        for m in ("lq", "lqi"):
            bb = r.get(f"build|{m}|{t}") or {}
            cells.append(", ".join(f"{k} x{v}" for k, v in bb.get("types", {}).items()) or "–")
        out.append(f"| {t} | {cells[0]} | {cells[1]} |")
    return out + [""]


def target_lines(r: dict[str, Any], types: list[str]) -> list[str]:
    """The report's target section: per type, the best qexport ratio and every variant's."""
    rows = {x["key"]: x for x in results_table(r, types)}
    out = ["## Target: qexport ΔPPL <= 0.5 x llama-quantize+imatrix ΔPPL", ""]
    for t in types:
        got = [(rows[k]["ratio"], m) for m in QEXPORT_METHODS
               if (k := f"{m}|{t}") in rows and rows[k]["ratio"] is not None]
        if not got:
            out.append(f"- {t}: not measured")
            continue
        ratio, m = min(got)
        verdict = "met" if ratio <= 0.5 else "NOT met"
        each = ", ".join(f"{mm} {r:.2f}" for r, mm in got)
        out.append(f"- {t}: best qexport ratio {ratio:.3f} ({m}; {each}) -> {verdict}")
    return out + [""]
