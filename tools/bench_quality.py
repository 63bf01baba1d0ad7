"""Quality / speed benchmark of the frontend methods on the sample model (DESIGN §7).

For each configuration: ``qexport quantize sample:smollm2 ...`` in a subprocess (wall time and
peak RSS measured with os.wait4), then ``qexport eval IR --text wiki.test.raw --windows 80``
(perplexity, all targets and second half). Results are cached in ``--out/results.json`` (a
configuration already measured is skipped unless ``--redo``) and written as a markdown table.

    .venv/bin/python tools/bench_quality.py --suite foundation      # FP, RTN/GPTQ W4g128s, W3g128a
    .venv/bin/python tools/bench_quality.py --suite methods         # + LeanQuant, TesseraQ, LoRC
    .venv/bin/python tools/bench_quality.py --suite table --only "W2"  # cells of issue 4's table
    .venv/bin/python tools/bench_quality.py --suite table --only GGUF --skip tesseraq  # fast cells
    .venv/bin/python tools/bench_quality.py --report                  # docs/bench/methods.md only

Every finished cell is also recorded in ``docs/bench/methods.json`` (committed), and each run
starts from that record: a cell measured on an earlier machine is not measured again.

Two cells at once (the 2 cores): give the second run its own ``--out DIR``, then
``tools/bench_quality.py --merge-from DIR`` moves its finished cells into the default cache and
rewrites the report.

``--suite table`` is issue 4's method table: rows RTN, GPTQ, LeanQuant (affine), LeanQuant-nu,
TesseraQ, each alone and + LoRC r=8; columns W4 g128 sym, W3 g128 asym, W2 g64 asym and the
GGUF grids Q4_0, IQ4_NL and Q3_K with llama.cpp's 256-column fallbacks (``--pure``). One cell
is one quantization (minutes to an hour on 2 cores), so the table fills over several runs; the
cache keeps every finished cell and ``docs/bench/methods.md`` shows the measured ones. A
TesseraQ cell still missing when its "+ LoRC r8" cell runs is read off that run's IR
(:data:`BASE_OF`), so one TesseraQ run fills both.

Calibration: 128 x 512 tokens of ../shared/data/exllamav2-cal/c4.utf8 (seed 0).
Evaluation: first 80 windows of 512 of ../shared/data/wikitext-2-raw/wiki.test.raw.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
CALIB = SHARED / "data" / "exllamav2-cal" / "c4.utf8"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
MODEL = "sample:smollm2"
DEFAULT_OUT = REPO / ".cache" / "bench_quality"
#: the committed record of every measured cell: a fresh checkout (or another --out) starts from
#: it, so cells measured on an earlier machine are neither lost nor re-measured
RECORD = REPO / "docs" / "bench" / "methods.json"

COLUMNS = {
    "W4 g128 sym": ["--bits", "4", "--group-size", "128", "--sym"],
    "W3 g128 asym": ["--bits", "3", "--group-size", "128", "--asym"],
    "W2 g64 asym": ["--bits", "2", "--group-size", "64", "--asym"],
    "GGUF Q4_0": ["--to", "gguf", "--type", "Q4_0", "--pure"],
    "GGUF IQ4_NL": ["--to", "gguf", "--type", "IQ4_NL", "--pure"],
    "GGUF Q3_K (fallbacks)": ["--to", "gguf", "--type", "Q3_K_S", "--pure"],
}
#: row label -> (qexport --method, extra quantize options)
VARIANTS = {
    "rtn": ("rtn", []),
    "gptq": ("gptq", []),
    "gptq, reference (--v-hessian plain --no-act-order)":
        ("gptq", ["--v-hessian", "plain", "--no-act-order"]),
    "leanquant": ("leanquant", []),
    "tesseraq": ("tesseraq", []),
    "tesseraq, --tq-grid-init minmax": ("tesseraq", ["--tq-grid-init", "minmax"]),
    "gptq + LoRC r8": ("gptq", ["--lorc-rank", "8"]),
    "leanquant-nu": ("leanquant-nu", []),
    "rtn + LoRC r8": ("rtn", ["--lorc-rank", "8"]),
    "leanquant + LoRC r8": ("leanquant", ["--lorc-rank", "8"]),
    "leanquant-nu + LoRC r8": ("leanquant-nu", ["--lorc-rank", "8"]),
    "tesseraq + LoRC r8": ("tesseraq", ["--lorc-rank", "8"]),
    "tesseraq + LoRC r8, --lorc-weight hessian":
        ("tesseraq", ["--lorc-rank", "8", "--lorc-weight", "hessian"]),
    "tesseraq + LoRC r8, --tq-lorc chain": ("tesseraq", ["--lorc-rank", "8", "--tq-lorc", "chain"]),
    "tesseraq + LoRC r8, --tq-lorc chain --lorc-weight hessian":
        ("tesseraq", ["--lorc-rank", "8", "--tq-lorc", "chain", "--lorc-weight", "hessian"]),
    "tesseraq + LoRC r8, --tq-lorc tune": ("tesseraq", ["--lorc-rank", "8", "--tq-lorc", "tune"]),
    "leanquant + LoRC r8, --lorc-weight hessian":
        ("leanquant", ["--lorc-rank", "8", "--lorc-weight", "hessian"]),
    "leanquant, --p 1": ("leanquant", ["--p", "1"]),
    "leanquant, --p 0": ("leanquant", ["--p", "0"]),
    "gptq, --refit 2": ("gptq", ["--refit", "2"]),
    "leanquant, --refit 2": ("leanquant", ["--refit", "2"]),
    "gptq, --asym-calib": ("gptq", ["--asym-calib"]),
    "leanquant, --asym-calib": ("leanquant", ["--asym-calib"]),
}
#: issue 4's table: row order and the columns a row cannot have (free codebooks: IR only)
#: qexport's LoRC variants (not ZeroQuant-V2's), measured where the paper's LoRC falls short
_LORC_VARIANTS = ["leanquant + LoRC r8, --lorc-weight hessian",
                  "tesseraq + LoRC r8, --lorc-weight hessian",
                  "tesseraq + LoRC r8, --tq-lorc chain",
                  "tesseraq + LoRC r8, --tq-lorc chain --lorc-weight hessian",
                  "tesseraq + LoRC r8, --tq-lorc tune"]
#: qexport's scale re-fit (qexport/methods/refit.py) on the layer-wise methods
_REFIT_ROWS = ["gptq, --refit 2", "leanquant, --refit 2"]
#: asymmetric calibration (qexport/calib_asym.py, GPTAQ's objective) on the layer-wise methods
_ASYM_ROWS = ["gptq, --asym-calib", "leanquant, --asym-calib"]
TABLE_ROWS = ["rtn", "gptq", "leanquant", "leanquant-nu", "tesseraq",
              "tesseraq, --tq-grid-init minmax", "rtn + LoRC r8", "gptq + LoRC r8",
              "leanquant + LoRC r8", "leanquant-nu + LoRC r8", "tesseraq + LoRC r8",
              *_LORC_VARIANTS, *_REFIT_ROWS, *_ASYM_ROWS]
#: rows shown only in the columns where they were measured (the suite does not run them)
OPTIONAL_ROWS = ("tesseraq, --tq-grid-init minmax", *_LORC_VARIANTS, *_REFIT_ROWS,
                 *_ASYM_ROWS)
_NOT_GGUF = ("GGUF Q4_0", "GGUF IQ4_NL", "GGUF Q3_K (fallbacks)")


#: rows read off another row's IR instead of a run of their own: TesseraQ fits LoRC after each
#: block from its final codes (the next block's input does not see the factors), so the base of
#: a "tesseraq + LoRC r8" IR is the "tesseraq" IR bit for bit (tests/test_cli_tesseraq.py::
#: test_lorc_leaves_tesseraq_codes_alone) and ``qexport eval --no-lorc`` measures it. The cell
#: then reports the LoRC run's quantize time (its SVDs included).
BASE_OF = {"tesseraq + LoRC r8": "tesseraq",
           "tesseraq + LoRC r8, --lorc-weight hessian": "tesseraq"}


def _cell_applies(row: str, column: str) -> bool:
    return not (row.startswith("leanquant-nu") and column in _NOT_GGUF)

#: the columns where LoRC r=8 must lower perplexity (issue 4): lorc-variants measures there
_LORC_COLUMNS = ("W2 g64 asym", "W3 g128 asym")
_FOUNDATION = ("rtn", "gptq", "gptq, reference (--v-hessian plain --no-act-order)")
SUITES = {
    "foundation": [(v, c) for c in ("W4 g128 sym", "W3 g128 asym") for v in _FOUNDATION],
    "methods": [(v, c) for c in ("W4 g128 sym", "W3 g128 asym")
                for v in ("leanquant", "tesseraq", "gptq + LoRC r8")],
    "table": [(v, c) for c in COLUMNS for v in TABLE_ROWS
              if _cell_applies(v, c) and v not in OPTIONAL_ROWS],
    # TesseraQ's grid before PAR: search (default) against the paper's min-max grid
    "tesseraq-init": [(v, c) for c in ("GGUF Q4_0", "W4 g128 sym")
                      for v in ("tesseraq", "tesseraq, --tq-grid-init minmax")],
    # LeanQuant's loss-weight exponent (default 2) at W4 / W3
    # LoRC's variants (qexport's options) where the paper's LoRC does not help TesseraQ
    "lorc-variants": [(v, c) for c in _LORC_COLUMNS for v in _LORC_VARIANTS],
    # qexport's --tq-lorc tune in the columns lorc-variants leaves out
    "tq-tune": [("tesseraq + LoRC r8, --tq-lorc tune", c) for c in COLUMNS
                if c not in _LORC_COLUMNS],
    "leanquant-p": [(v, c) for c in ("W4 g128 sym", "W3 g128 asym")
                    for v in ("leanquant, --p 1", "leanquant, --p 0")],
    # --refit 2 (qexport's closed-form scale re-fit) on GPTQ and LeanQuant, every column
    "refit": [(v, c) for c in COLUMNS for v in _REFIT_ROWS],
    # --asym-calib (GPTAQ's asymmetric objective) on GPTQ and LeanQuant, every column
    "asym": [(v, c) for c in COLUMNS for v in _ASYM_ROWS],
}


def _run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS in MiB of that process)."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, ru = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, ru.ru_maxrss / 1024


def _qexport(*args: str) -> list[str]:
    return [sys.executable, "-m", "qexport.cli", *args]


def _eval(target: str, out: Path, key: str, *extra: str) -> dict:
    log = out / f"{key}.eval.log"
    js = out / f"{key}.eval.json"
    rc, wall, rss = _run(_qexport("eval", target, "--text", str(WIKI), "--windows", "80",
                                  "--json", "--quiet", *extra), log)
    if rc != 0:
        raise SystemExit(f"eval of {target} failed (exit {rc}); see {log}")
    text = log.read_text()
    res = json.loads(text[text.index("{"):])
    js.write_text(json.dumps(res, indent=1))
    return {"ppl_all": res["all_targets"], "ppl_second_half": res["second_half"],
            "eval_seconds": round(wall, 1)}


def _file_key(label: str, column: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{label}__{column}")


def derive_base(label: str, column: str, out: Path, lorc_res: dict) -> dict:
    """The ``BASE_OF[label]`` cell of ``column`` from ``label``'s IR (see :data:`BASE_OF`):
    PPL of ``eval --no-lorc``, bits/weight of the codes and grids only."""
    from qexport.inspect_cmd import ir_rows
    ir = out / f"{_file_key(label, column)}.qir"
    rows, totals = ir_rows(ir)
    q = [r for r in rows if "bits" in r]
    bits = sum(r["bits"]["codes"] + r["bits"]["grid"] for r in q)
    base, (method, extra) = BASE_OF[label], VARIANTS[BASE_OF[label]]
    res = {"method": base, "column": column, "options": [method, *extra], "derived_from": label,
           "quantize_seconds": lorc_res["quantize_seconds"],
           "peak_rss_mib": lorc_res["peak_rss_mib"],
           "bpw": round(bits / totals["quantized_weights"], 4),
           "provenance_seconds": lorc_res.get("provenance_seconds")}
    res.update(_eval(str(ir), out, _file_key(base, column), "--no-lorc"))
    return res


def measure(label: str, column: str, out: Path) -> dict:
    method, extra = VARIANTS[label]
    key = _file_key(label, column)
    ir = out / f"{key}.qir"
    shutil.rmtree(ir.with_name(ir.name + ".partial"), ignore_errors=True)  # a killed earlier run
    cmd = _qexport("quantize", MODEL, "--method", method, *COLUMNS[column], *extra,
                   "--calib", str(CALIB), "--n-samples", "128", "--seq-len", "512",
                   "-o", str(ir), "--force", "--quiet")
    rc, wall, rss = _run(cmd, out / f"{key}.quantize.log")
    if rc != 0:
        return {"error": f"quantize exit {rc}: {(out / f'{key}.quantize.log').read_text()[-300:]}"}
    man = json.loads((ir / "manifest.json").read_text())
    from qexport.inspect_cmd import ir_rows
    _, totals = ir_rows(ir)
    res = {"method": label, "column": column, "options": [method, *extra],
           "quantize_seconds": round(wall, 1),
           "peak_rss_mib": round(rss), "bpw": totals["bpw_quantized"],
           "provenance_seconds": man["provenance"].get("seconds")}
    res.update(_eval(str(ir), out, key))
    return res


def table(results: dict) -> str:
    rows = ["| method | grid | bits/weight | PPL all | PPL 2nd half | quantize s | peak RSS MiB |",
            "|---|---|---:|---:|---:|---:|---:|"]
    fp = results.get("fp")
    if fp:
        rows.append(f"| FP (dequantized Q4_1 source) | – | 32 | {fp['ppl_all']:.3f} | "
                    f"{fp['ppl_second_half']:.3f} | – | – |")
    for k, r in results.items():
        if k == "fp" or "error" in r:
            continue
        half = r.get("ppl_second_half")
        rows.append(f"| {r['method']} | {r['column']} | {r['bpw']:.3f} | {r['ppl_all']:.3f} | "
                    f"{'–' if half is None else f'{half:.3f}'} | {r['quantize_seconds']:.0f} | "
                    f"{r.get('peak_rss_mib', '–')} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="foundation", choices=sorted(SUITES))
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="cache folder; docs/bench/methods.md is written from the default one")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--only", default=None, help="substring filter on method__column")
    ap.add_argument("--skip", action="append", default=[],
                    help="leave out cells whose method|column contains this (repeatable)")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite docs/bench/methods.md from the cache")
    ap.add_argument("--merge-from", action="append", default=[], metavar="DIR",
                    help="move the finished cells of another --out folder (a run beside this "
                         "one) into --out, then rewrite the report (repeatable)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rf = out / "results.json"
    results = load_results(rf)
    for d in a.merge_from:
        for key in merge_cells(Path(d), out, results, replace=a.redo):
            print(f"merged {key}: {results[key]['ppl_all']:.3f}")
        rf.write_text(json.dumps(results, indent=1))
    if a.report or a.merge_from:
        (out / "results.md").write_text(table(results))
        if out.resolve() == DEFAULT_OUT.resolve():
            write_methods(results)
        return
    if "fp" not in results or (a.redo and (not a.only or a.only == "fp")):
        results["fp"] = _eval(MODEL, out, "fp")
        rf.write_text(json.dumps(results, indent=1))

    def todo(key: str) -> bool:
        return a.redo or key not in results or "error" in results[key]

    cells = [(m, c) for m, c in SUITES[a.suite] if not (a.only and a.only not in f"{m}|{c}")
             and not any(x in f"{m}|{c}" for x in a.skip)]
    derived = {(BASE_OF[m], c) for m, c in cells
               if m in BASE_OF and todo(f"{m}|{c}") and todo(f"{BASE_OF[m]}|{c}")}
    for method, column in cells:
        key = f"{method}|{column}"
        if not todo(key) or (method, column) in derived:
            continue
        print(f"== {key}", flush=True)
        results[key] = measure(method, column, out)
        rf.write_text(json.dumps(results, indent=1))
        print(json.dumps(results[key]), flush=True)
        if (BASE_OF.get(method), column) in derived and "error" not in results[key]:
            base = f"{BASE_OF[method]}|{column}"
            print(f"== {base} (the base of {key}: eval --no-lorc)", flush=True)
            results[base] = derive_base(method, column, out, results[key])
            rf.write_text(json.dumps(results, indent=1))
            print(json.dumps(results[base]), flush=True)
    md = table(results)
    (out / "results.md").write_text(md)
    if out.resolve() == DEFAULT_OUT.resolve():
        write_methods(results)
    print(md)


def load_results(rf: Path) -> dict:
    """The cache ``rf`` over the committed :data:`RECORD` (the cache wins where both hold a
    cell); a cell of the record is skipped like a cached one."""
    rec = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    return {**rec, **(json.loads(rf.read_text()) if rf.is_file() else {})}


def merge_cells(src: Path, out: Path, results: dict, replace: bool = False) -> list[str]:
    """Move ``src``'s finished cells (results entries and ``<file key>.*`` files) into ``out``
    and ``results``; cells already in ``results`` stay unless ``replace``. Returns their keys.
    ``src``'s FP entry must equal ``results``' (same evaluation)."""
    theirs = json.loads((src / "results.json").read_text())
    if "fp" in results and theirs.get("fp", {}).get("ppl_all") != results["fp"]["ppl_all"]:
        raise SystemExit(f"{src}: FP perplexity {theirs.get('fp', {}).get('ppl_all')} expected "
                         f"equal to {out}'s {results['fp']['ppl_all']}: not the same evaluation")
    moved = []
    for key, r in theirs.items():
        if key == "fp" or "error" in r or (key in results and not replace):
            continue
        label, column = key.split("|")
        for f in src.glob(_file_key(label, column) + ".*"):
            dst = out / f.name
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            shutil.move(str(f), str(dst))
        results[key] = r
        moved.append(key)
    left = {k: v for k, v in theirs.items() if k not in moved}
    (src / "results.json").write_text(json.dumps(left, indent=1))    # moved, not copied
    return moved


def write_methods(results: dict) -> None:
    """docs/bench/methods.md (issue 4's table) from whatever cells are measured."""
    from bench_quality_report import methods_markdown
    doc = REPO / "docs" / "bench" / "methods.md"
    doc.write_text(methods_markdown(results, TABLE_ROWS, list(COLUMNS), _cell_applies,
                                    OPTIONAL_ROWS))
    rec = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    rec.update({k: v for k, v in results.items() if "error" not in v})   # cells only added
    from qexport.atomic import atomic_output
    with atomic_output(RECORD, is_dir=False, force=True) as tmp:
        tmp.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
