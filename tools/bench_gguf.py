"""GGUF benchmark (issue 3): qexport vs llama-quantize on the sample model, llama.cpp perplexity.

    nice -n 19 .venv/bin/python tools/bench_gguf.py --quick     # smoke run (10 chunks, 16 samples)
    nice -n 19 .venv/bin/python tools/bench_gguf.py            # full -> docs/bench/gguf.{md,png}

Model: ``sample:smollm2`` (SmolLM2-135M-Instruct; its weights are dequantized Q4_1 and the F32
reference is that dequantized model). Steps (each cached in
``.cache/bench_gguf/{full,quick}/results.json`` and skipped on rerun once done;
``--redo KEY-SUBSTRING`` forgets matching entries). The full run's finished steps are also kept
in the committed record ``docs/bench/gguf.json`` (written with the report); a fresh checkout
starts from it, so only the steps missing from both the record and the cache are run.

1. F32 GGUF written by qexport (IR without quantized tensors, ``backends.gguf.writer.lower_gguf``).
2. ``llama-imatrix`` on the calibration text (``-c 512``, as many chunks as qexport's samples);
   qexport's own imatrix (:func:`qexport.imatrix.compute_imatrix`, the same 128 x 512 seeded
   windows as ``--method gptq``), saved as a llama-imatrix GGUF.
3. Per type: ``llama-quantize`` without / with imatrix; ``qexport convert --method rtn`` (CLI;
   must reproduce llama-quantize's bytes); qexport RTN with llama-imatrix's file (must reproduce
   llama-quantize + imatrix); qexport RTN with qexport's imatrix (compared with llama-quantize
   given that imatrix); qexport GPTQ. Calibrated/imatrix files use llama.cpp's "with imatrix"
   recipe, so they have the same tensor types and size as llama-quantize + imatrix.
4. ``llama-perplexity -f wiki.test.raw -c 512 -b 512 --chunks 100 -t 2``. A file whose tensors
   are byte-identical to its llama-quantize counterpart reuses that measurement.
5. Markdown table + plot.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_gguf_report as rep  # noqa: E402

SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
CALIB = SHARED / "data" / "exllamav2-cal" / "c4.utf8"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
TOOLS = REPO / ".cache" / "llama-tools"
MODEL = "sample:smollm2"
TYPES = ["Q4_0", "IQ4_NL", "Q4_K_M", "Q3_K_M", "Q2_K"]
#: the committed record of the full run's finished steps (results.json's entries) and, under
#: :data:`QUICK_CMP`, the ``--quick`` run's byte comparisons
RECORD = REPO / "docs" / "bench" / "gguf.json"
QUICK_CMP = "quick_cmp"


@dataclass
class Settings:
    out: Path
    ppl_chunks: int = 100
    calib_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    threads: int = 2
    quick: bool = False


class Bench:
    """Cached steps; ``self.results`` is saved after every finished step. The full run starts
    from :data:`RECORD` under its cache (the cache wins): a recorded step is skipped."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        s.out.mkdir(parents=True, exist_ok=True)
        self.file = s.out / "results.json"
        self.record: dict[str, Any] = json.loads(RECORD.read_text()) \
            if not s.quick and RECORD.is_file() else {}
        cache = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.results: dict[str, Any] = {**{k: v for k, v in self.record.items()
                                           if k != QUICK_CMP}, **cache}
        self._src = None

    # -- bookkeeping --------------------------------------------------------------------------
    def save(self) -> None:
        from qexport.atomic import atomic_output
        with atomic_output(self.file, is_dir=False, force=True) as tmp:
            tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))

    def step(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key in self.results and "error" not in self.results[key]:
            return self.results[key]
        print(f"== {key}", flush=True)
        t0 = time.time()
        try:
            res = fn()
        except Exception as e:                    # recorded, the other steps still run
            res = {"error": f"{type(e).__name__}: {e}"}
        res.setdefault("seconds", round(time.time() - t0, 1))
        self.results[key] = res
        self.save()
        print(f"   {json.dumps(res)[:400]}", flush=True)
        return res

    def path(self, key: str) -> Path:
        return self.s.out / (key.replace("|", "-") + ".gguf")

    def src(self) -> Any:
        if self._src is None:
            from qexport.model import load_model
            self._src = load_model(MODEL)
        return self._src

    def run(self, cmd: list[str], log: Path) -> None:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
        if rc != 0:
            raise RuntimeError(f"exit {rc}: {' '.join(cmd[:3])} ...; see {log}")

    def built(self, key: str) -> dict[str, Any]:
        return {"path": str(self.path(key)), **rep.gguf_stats(self.path(key))}

    # -- artifacts ----------------------------------------------------------------------------
    def build_f32(self) -> dict[str, Any]:
        import numpy as np

        from qexport.backends.gguf.writer import lower_gguf
        from qexport.ir import QModel
        src = self.src()
        pt = {n: np.asarray(src.get(n), dtype=np.float32) for n in src.tensor_names()}
        qm = QModel(config=dict(src.config), passthrough=pt, tokenizer=dict(src.tokenizer),
                    recipe={}, provenance={"source": src.source})
        lower_gguf(qm, self.path("f32"), force=True)
        return self.built("f32")

    def llama_imatrix(self) -> dict[str, Any]:
        out = self.s.out / "imatrix-llama.gguf"
        self.run([str(TOOLS / "llama-imatrix"), "-m", str(self.path("f32")), "-f", str(CALIB),
                  "-c", str(self.s.seq_len), "-b", str(self.s.seq_len),
                  "--chunks", str(self.s.calib_samples), "-t", str(self.s.threads),
                  "--output-frequency", "100000", "-o", str(out)],
                 self.s.out / "imatrix-llama.log")
        from qexport.imatrix import load_imatrix_gguf
        _, meta = load_imatrix_gguf(out)
        return {"path": str(out), **{k: v for k, v in meta.items() if k != "datasets"}}

    def qexport_imatrix(self) -> dict[str, Any]:
        from qexport.imatrix import compute_imatrix, save_imatrix_gguf
        im, info = compute_imatrix(self.src(), CALIB, n_samples=self.s.calib_samples,
                                   seq_len=self.s.seq_len, seed=self.s.seed, progress=False)
        out = self.s.out / "imatrix-qexport.gguf"
        save_imatrix_gguf(im, out, tokens=info["tokens"], chunk_size=self.s.seq_len,
                          dataset=CALIB.name)
        return {"path": str(out), "entries": len(im), "tokens": info["tokens"],
                "calib_hash": info["hash"]}

    def llama_quantize(self, key: str, t: str, imatrix: Path | None) -> dict[str, Any]:
        cmd = [str(TOOLS / "llama-quantize")]
        if imatrix is not None:
            cmd += ["--imatrix", str(imatrix)]
        cmd += [str(self.path("f32")), str(self.path(key)), t, str(self.s.threads)]
        self.run(cmd, self.path(key).with_suffix(".log"))
        return self.built(key)

    def qexport_cli_rtn(self, key: str, t: str) -> dict[str, Any]:
        self.run([sys.executable, "-m", "qexport.cli", "convert", MODEL, "--to", "gguf",
                  "--type", t, "--method", "rtn", "-o", str(self.path(key)), "--force",
                  "--quiet"], self.path(key).with_suffix(".log"))
        return self.built(key)

    def plan(self, t: str, imatrix: bool) -> dict[str, Any]:
        from qexport.backends.gguf.recipes import plan_recipe
        from qexport.backends.gguf.types import spec_for
        from qexport.commands import model_shapes
        from qexport.specs import TensorPlan
        src = self.src()
        pr = plan_recipe(t, src.config, model_shapes(src), imatrix=imatrix)
        return {n: TensorPlan(spec_for(p.type_name), p.reason) for n, p in pr.items()
                if p.type_name not in ("F16", "F32")}

    def lower(self, qm: Any, key: str, t: str) -> dict[str, Any]:
        from qexport.backends.gguf.writer import lower_gguf
        qm.recipe.update({"name": t, "target": "gguf"})
        lower_gguf(qm, self.path(key), force=True, name=self.src().source)
        return self.built(key)

    def qexport_rtn_imatrix(self, key: str, t: str, imatrix_file: Path) -> dict[str, Any]:
        from qexport.imatrix import load_imatrix_gguf, quantize_rtn_imatrix
        im, _ = load_imatrix_gguf(imatrix_file)
        qm = quantize_rtn_imatrix(self.src(), self.plan(t, True), im, progress=False)
        return self.lower(qm, key, t)

    def qexport_gptq(self, key: str, t: str, method: str = "gptq") -> dict[str, Any]:
        """qexport ``method``, a name of :data:`QEXPORT_METHODS` (gptq and leanquant with
        act-order, as run for the README; tesseraq with its defaults: block reconstruction, no
        Hessian options). The IR before any ``--e2e`` stage is cached under ``OUT/ir``
        (tools/bench_ir_cache.py), so e2e variants reuse their base variant's IR."""
        from bench_ir_cache import cached_ir
        qm = cached_ir(self.s.out, t, self.src(), self.plan(t, True), self.options(method))
        out = self.lower(qm, key, t)
        if "e2e" in qm.provenance:           # the tuning's KL record (nats/token)
            out["e2e"] = {k: qm.provenance["e2e"].get(k) for k in ("epoch_loss", "holdout_kl")}
        return out

    def options(self, method: str) -> Any:
        """The QuantizeOptions of a :data:`QEXPORT_METHODS` variant."""
        from qexport.pipeline import QuantizeOptions
        name, extra = QEXPORT_METHODS[method][:2]
        kw = {"seed": self.s.seed, **extra}              # a variant may set its own seed
        return QuantizeOptions(method=name, calib=str(CALIB), n_samples=self.s.calib_samples,
                               seq_len=self.s.seq_len, progress=False,
                               act_order=None if name == "tesseraq" else True, **kw)

    def adopt(self, spec: str) -> None:
        """``--adopt-ir METHOD:TYPE:PATH``: an IR built by the CLI with METHOD's settings
        becomes the cached base IR of METHOD at TYPE (checked by bench_ir_cache.adopt_ir)."""
        from bench_ir_cache import adopt_ir
        method, t, path = spec.split(":", 2)
        dst = adopt_ir(self.s.out, t, self.plan(t, True), self.options(method), Path(path))
        print(f"adopted {path} as the base IR of {method} at {t}: {dst}")

    # -- measurements -------------------------------------------------------------------------
    def perplexity(self, key: str) -> dict[str, Any]:
        log = self.s.out / (key.replace("|", "-") + ".ppl.log")
        self.run([str(TOOLS / "llama-perplexity"), "-m", str(self.path(key)), "-f", str(WIKI),
                  "-c", "512", "-b", "512", "--chunks", str(self.s.ppl_chunks),
                  "-t", str(self.s.threads)], log)
        got = rep.parse_ppl(log.read_text(errors="replace"))
        if got is None:
            raise RuntimeError(f"no 'Final estimate' line in {log}")
        return {"ppl": got[0], "ppl_err": got[1], "chunks": self.s.ppl_chunks}

    def compare(self, a: str, b: str, t: str) -> dict[str, Any]:
        pa, pb = self.path(f"{a}|{t}"), self.path(f"{b}|{t}")
        if not (pa.is_file() and pb.is_file()):
            raise RuntimeError(f"missing {pa.name} or {pb.name}")
        return rep.compare_gguf(pa, pb)

    def ppl_or_alias(self, key: str, ref: str, cmp_key: str) -> None:
        """Measure ``key`` unless its tensors equal ``ref``'s bytes (then reuse ``ref``'s PPL)."""
        c = self.results.get(cmp_key, {})
        if c.get("tensors_identical"):
            self.results[f"alias|{key}"] = ref
            self.save()
        else:
            self.step(f"ppl|{key}", lambda: self.perplexity(key))


QEXPORT_METHODS = rep.QEXPORT_METHODS
DEFAULT_METHODS = ("gptq", "leanquant", "tesseraq")


def run_all(b: Bench, types: list[str], methods: tuple[str, ...] = DEFAULT_METHODS,
            headline_only: bool = False) -> None:
    """Every step, the headline comparison first (so partial runs are useful): llama.cpp files,
    qexport ``methods`` vs llama-quantize + imatrix, llama-quantize alone, qexport's imatrix,
    and last the byte reproductions of llama-quantize by qexport rtn. ``headline_only``: stop
    after the qexport methods (the rest can be run later; every step is cached)."""
    b.step("build|f32", b.build_f32)
    b.step("ppl|f32", lambda: b.perplexity("f32"))
    lim = b.s.out / "imatrix-llama.gguf"
    qim = b.s.out / "imatrix-qexport.gguf"
    b.step("imatrix|llama", b.llama_imatrix)
    for t in types:
        b.step(f"build|lq|{t}", lambda: b.llama_quantize(f"lq|{t}", t, None))
        b.step(f"build|lqi|{t}", lambda: b.llama_quantize(f"lqi|{t}", t, lim))
    for t in types:
        b.step(f"ppl|lqi|{t}", lambda: b.perplexity(f"lqi|{t}"))
        for m in methods:
            b.step(f"build|{m}|{t}", lambda: b.qexport_gptq(f"{m}|{t}", t, method=m))
            b.step(f"ppl|{m}|{t}", lambda: b.perplexity(f"{m}|{t}"))
    if headline_only:
        return
    for t in types:
        b.step(f"ppl|lq|{t}", lambda: b.perplexity(f"lq|{t}"))
    b.step("imatrix|qexport", b.qexport_imatrix)
    b.step("imatrix|agreement", lambda: rep.imatrix_agreement(lim, qim))
    for t in types:
        b.step(f"build|lqq|{t}", lambda: b.llama_quantize(f"lqq|{t}", t, qim))
        b.step(f"build|rtn-imat|{t}", lambda: b.qexport_rtn_imatrix(f"rtn-imat|{t}", t, qim))
        b.step(f"cmp|rtn-imat|lqq|{t}", lambda: b.compare("rtn-imat", "lqq", t))
        b.step(f"ppl|rtn-imat|{t}", lambda: b.perplexity(f"rtn-imat|{t}"))
    for t in types:
        b.step(f"build|rtn|{t}", lambda: b.qexport_cli_rtn(f"rtn|{t}", t))
        b.step(f"cmp|rtn|lq|{t}", lambda: b.compare("rtn", "lq", t))
        b.step(f"build|rtn-llimat|{t}", lambda: b.qexport_rtn_imatrix(f"rtn-llimat|{t}", t, lim))
        b.step(f"cmp|rtn-llimat|lqi|{t}", lambda: b.compare("rtn-llimat", "lqi", t))
        b.ppl_or_alias(f"rtn|{t}", f"lq|{t}", f"cmp|rtn|lq|{t}")


def quick_cmp(b: Bench) -> dict[str, Any] | None:
    """The --quick run's ``cmp|...`` entries: from its cache, else from the record."""
    qf = b.s.out.parent / "quick" / "results.json"
    if not qf.is_file():
        return b.record.get(QUICK_CMP)
    return {k: v for k, v in json.loads(qf.read_text()).items()
            if k.startswith("cmp|") and "error" not in v}


def quick_repro_lines(b: Bench, types: list[str]) -> list[str]:
    """The --quick run's reproduction table (rtn without imatrix does not depend on the run's
    settings; the imatrix rows use its 16-chunk imatrices), when this is the full run."""
    q = None if b.s.quick else quick_cmp(b)
    if not q:
        return []
    return ["From the `--quick` run (same code; its imatrices from 16 chunks / 16 windows):", "",
            rep.repro_table(q, types)]


def write_record(b: Bench) -> None:
    """:data:`RECORD`: every entry of the results without an error (``path`` relative to the
    repository where it lies in it) and the --quick run's comparisons."""
    root = str(REPO) + os.sep
    rec = {k: {**v, "path": v["path"][len(root):]}
           if isinstance(v, dict) and str(v.get("path", "")).startswith(root) else v
           for k, v in b.results.items() if not (isinstance(v, dict) and "error" in v)}
    q = quick_cmp(b)
    if q is not None:
        rec[QUICK_CMP] = q
    from qexport.atomic import atomic_output
    with atomic_output(RECORD, is_dir=False, force=True) as tmp:
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def write_report(b: Bench, types: list[str], md: Path, png: Path) -> None:
    r = b.results
    s = b.s
    title = (f"SmolLM2-135M-Instruct, wikitext-2 test, llama-perplexity -c 512 "
             f"--chunks {s.ppl_chunks}")
    md.parent.mkdir(parents=True, exist_ok=True)
    rep.plot_results(r, types, png, title)
    walls = {k: v.get("seconds") for k, v in sorted(r.items())   # steps (not alias strings)
             if isinstance(v, dict)}
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    quick = " (QUICK smoke run)" if s.quick else ""
    text = [f"# GGUF: qexport vs llama-quantize on {MODEL}{quick}",
            "", "Generated by `tools/bench_gguf.py`" + (" --quick" if s.quick else "") +
            f"; settings: `{json.dumps({k: str(v) for k, v in asdict(s).items() if k != 'out'})}`.",
            "", rep.table_markdown(r, types), f"![PPL vs file size]({png.name})", "",
            *rep.target_lines(r, types), rep.NOTES,
            "## Byte reproduction of llama-quantize", "", rep.repro_table(r, types),
            *quick_repro_lines(b, types),
            *rep.imatrix_lines(r), *rep.types_lines(r, types),
            "## Wall times (s, under `nice -n 19` on the shared 2-core machine)", "",
            "```", json.dumps(walls, indent=0), "```"]
    if errors:
        text += ["", "## Errors", "", "```", json.dumps(errors, indent=1), "```"]
    md.write_text("\n".join(text) + "\n")
    if not s.quick:
        write_record(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 PPL chunks, 16 calibration samples")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--out", default=None, help="cache folder (default .cache/bench_gguf[/quick])")
    ap.add_argument("--redo", action="append", default=[],
                    help="forget cached and recorded keys containing this (repeatable)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"qexport methods to run, in order (default {','.join(DEFAULT_METHODS)}; "
                         f"all: {','.join(QEXPORT_METHODS)})")
    ap.add_argument("--headline-only", action="store_true",
                    help="only llama-quantize+imatrix and the qexport methods (no reproductions)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--adopt-ir", action="append", default=[], metavar="METHOD:TYPE:PATH",
                    help="use an IR made by `qexport quantize` with METHOD's settings as its "
                         "cached base IR at TYPE (options and grids checked; repeatable)")
    a = ap.parse_args()
    out = Path(a.out) if a.out else REPO / ".cache" / "bench_gguf" / ("quick" if a.quick
                                                                      else "full")
    small = {"ppl_chunks": 10, "calib_samples": 16} if a.quick else {}
    s = Settings(out=out, quick=a.quick, **small)
    b = Bench(s)
    for pat in a.redo:
        for k in [k for k in b.results if pat in k]:
            del b.results[k]
    if a.redo:                  # forgotten by the record too (else the next start restores it)
        b.save()
        if not a.quick:
            write_record(b)
    types = a.types.split(",")
    import torch
    torch.set_num_threads(s.threads)
    for spec in a.adopt_ir:
        b.adopt(spec)
    if not a.report_only:
        methods = tuple(a.methods.split(","))
        bad = [m for m in methods if m not in QEXPORT_METHODS]
        if bad:
            raise SystemExit(f"--methods: expected names from {list(QEXPORT_METHODS)} (not {bad})")
        run_all(b, types, methods, a.headline_only)
    md = out / "gguf.md" if a.quick else REPO / "docs" / "bench" / "gguf.md"
    write_report(b, types, md, md.with_suffix(".png"))
    print(md.read_text())


if __name__ == "__main__":
    main()
