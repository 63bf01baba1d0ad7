"""qexport's ONNX (MatMulNBits) against onnxruntime's own weight quantizer on the sample model.

Rows (4-bit; block 32 asymmetric and block 128 symmetric, the same grid for peer and us):

| row            | how the ONNX is made                                                         |
|----------------|------------------------------------------------------------------------------|
| FP             | qexport's decoder graph with every linear a float MatMul (an IR with no      |
|                | quantized tensor, lowered by ``lower_onnx``)                                 |
| ORT default    | ``MatMulNBitsQuantizer`` + ``DefaultWeightOnlyQuantConfig`` on the FP graph  |
|                | (MLAS RTN, what onnxruntime-genai's builder uses)                            |
| ORT RTN        | ``RTNWeightOnlyQuantConfig`` (vendored Intel Neural Compressor RTN)          |
| ORT HQQ        | ``HQQWeightOnlyQuantConfig`` (always asymmetric, float zero points)          |
| ORT GPTQ       | onnxruntime's GPTQ functions (``neural_compressor.weight_only``)             |
| qexport rtn    | ``qexport quantize --to onnx --method rtn`` then ``lower_onnx``             |
| qexport gptq   | ``qexport quantize --to onnx --method gptq`` then ``lower_onnx``            |

ORT GPTQ is onnxruntime's GPTQ code with a one-pass Hessian collection (tools/bench_onnx_peer.py
says why; ``--check-ort-gptq`` compares it with the unmodified driver on one sample).

Calibration (qexport and ORT GPTQ): 128 x 512 tokens of ``c4.utf8``, seed 0. Perplexity: DESIGN
section 7 through onnxruntime (CPU EP, accuracy_level 0), first 80 (``--quick``: 8) windows of
512 of ``wiki.test.raw``. Decode speed: a 128-token prompt, then 64 greedy tokens with the KV
cache, at accuracy_level 0 and 4 (set on every MatMulNBits node of the same file), 2 threads.
Results: ``.cache/bench_onnx/results.json`` (measured rows are skipped); report:
``docs/bench/onnx.md`` (tools/bench_onnx_report.py).

    nice -n 19 .venv/bin/python tools/bench_onnx.py --quick          # develop
    nice -n 19 .venv/bin/python tools/bench_onnx.py --speed-rounds 5 # full; resumable
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_onnx_measure import decode_speed, perplexity_ort, weight_stats
from bench_onnx_report import best_ort, table, targets, write_report

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
CALIB = SHARED / "data" / "exllamav2-cal" / "c4.utf8"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
MODEL = "sample:smollm2"
THREADS = 2
N_CALIB, CALIB_LEN, SEED = 128, 512, 0
PROMPT = 128


@dataclass(frozen=True)
class Row:
    key: str
    tool: str          # fp | ort | qexport
    algo: str          # none | default | rtn | hqq | gptq
    block: int = 0
    sym: bool = False

    @property
    def label(self) -> str:
        if self.tool == "fp":
            return "FP (float MatMul)"
        name = f"ORT {self.algo.upper()}" if self.tool == "ort" else f"qexport {self.algo}"
        zero = "asym float-zp" if self.algo == "hqq" else ("sym" if self.sym else "asym")
        return f"{name} (b{self.block} {zero})"


def _rows() -> list[Row]:
    rows = [Row("fp", "fp", "none")]
    for block, sym in ((32, False), (128, True)):
        tag = f"b{block}-{'sym' if sym else 'asym'}"
        for algo in ("default", "rtn", "hqq", "gptq"):
            rows.append(Row(f"ort-{algo}-{tag}", "ort", algo, block, sym))
        for algo in ("rtn", "gptq", "leanquant", "tesseraq"):
            rows.append(Row(f"qexport-{algo}-{tag}", "qexport", algo, block, sym))
    return rows


ROWS = _rows()


# ---- artifacts ----------------------------------------------------------------------------
def build_fp(out: Path) -> Path:
    """qexport's decoder graph with float linears (an IR holding no quantized tensor)."""
    from qexport.backends.onnx import lower_onnx
    from qexport.ir import QModel
    from qexport.model.load import load_model
    src = load_model(MODEL)
    qm = QModel(config=dict(src.config), tokenizer=dict(src.tokenizer),
                passthrough={n: np.asarray(src.get(n), np.float32) for n in src.tensor_names()},
                recipe={"name": "fp"}, provenance={"method": "none", "source": MODEL})
    return lower_onnx(qm, out)


def _tokenizer_files(fp_dir: Path) -> dict[str, bytes]:
    names = json.loads((fp_dir / "qexport_onnx.json").read_text())["files"]
    return {n: (fp_dir / n).read_bytes() for n in names
            if n.startswith("tokenizer") or n.endswith((".jinja", "gguf_tokenizer.json"))}


def _save_beside(proto: Any, fp_dir: Path, out: Path) -> None:
    """Write ``proto`` as ``out/model.onnx`` (+ .data) with the FP folder's tokenizer files."""
    import onnx
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save_model(proto, str(tmp / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    for f in fp_dir.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data", "qexport_onnx.json"):
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)


def calib_reader(fp_dir: Path, n: int = N_CALIB) -> tuple[Any, dict[str, Any]]:
    """The first ``n`` calibration windows qexport's GPTQ uses (``load_calibration``; its info
    dict, whose ``hash`` matches the qexport IRs' provenance)."""
    from bench_onnx_peer import CalibReader
    from qexport.calib import load_calibration
    samples, info = load_calibration(CALIB, _tokenizer_files(fp_dir), N_CALIB, CALIB_LEN, SEED)
    cfg = json.loads((fp_dir / "genai_config.json").read_text())["model"]["decoder"]
    return CalibReader(samples.numpy()[:n], cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                       cfg["head_size"]), info


def ort_row(row: Row, fp_dir: Path, out: Path) -> dict[str, Any]:
    """Quantize the FP graph with onnxruntime's quantizer (bench_onnx_peer); timing info."""
    import onnx
    from bench_onnx_peer import ort_quantize
    proto = onnx.load(str(fp_dir / "model.onnx"))
    reader, info = calib_reader(fp_dir) if row.algo == "gptq" else (None, {})
    t0 = time.time()
    proto = ort_quantize(row.algo, row.block, row.sym, proto, reader)
    seconds = round(time.time() - t0, 1)
    _save_beside(proto, fp_dir, out)
    note = f"calibration {len(reader)} x {CALIB_LEN}, hash {info['hash'][:12]}" if reader else ""
    return {"quantize_seconds": seconds, "note": note}


def _ir_matches(ir: Path, row: Row) -> str | None:
    """Why an existing IR is not this row's configuration (None: it is)."""
    man = json.loads((ir / "manifest.json").read_text())
    opts = man["provenance"].get("options", {})
    want = {"method": row.algo, "n_samples": N_CALIB, "seq_len": CALIB_LEN, "seed": SEED}
    for k, v in want.items():
        if opts.get(k) != v:
            return f"{k} = {opts.get(k)!r} (expected {v!r})"
    if Path(str(opts.get("calib", ""))).name != CALIB.name:
        return f"calib = {opts.get('calib')!r} (expected {CALIB.name})"
    zero = "none" if row.sym else "int"
    for spec in man["specs"].values():
        if (spec["bits"], spec["group_size"], spec["zero"]) != (4, row.block, zero):
            return f"spec {spec['name']} (expected 4-bit, group {row.block}, zero {zero})"
    return None


def qexport_quantize(row: Row, cache: Path, out: Path, reuse: dict[str, Path]) -> dict[str, Any]:
    """``qexport quantize --to onnx`` (or a matching existing IR), then ``lower_onnx``."""
    from qexport.backends.onnx import lower_onnx
    from qexport.irio import load_ir
    ir = reuse.get(row.key, cache / f"{row.key}.qir")
    seconds = None
    partial = ir.with_name(ir.name + ".partial")
    if not (ir / "manifest.json").is_file() and partial.exists():
        raise RuntimeError(f"{partial} exists: a quantization of this row is running or was "
                           "interrupted (finish it with qexport quantize --resume)")
    if not (ir / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "qexport.cli", "quantize", MODEL, "--to", "onnx",
               "--method", row.algo, "--bits", "4", "--group-size", str(row.block),
               "--sym" if row.sym else "--asym", "--calib", str(CALIB), "--n-samples",
               str(N_CALIB), "--seq-len", str(CALIB_LEN), "--seed", str(SEED), "-o", str(ir),
               "--quiet"]
        t0 = time.time()
        log = cache / f"{row.key}.quantize.log"
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": str(THREADS)}).returncode
        if rc != 0:
            raise RuntimeError(f"qexport quantize failed (exit {rc}); see {log}")
        seconds = round(time.time() - t0, 1)
    side = cache / f"{row.key}.quantize.json"
    if seconds is not None:
        side.write_text(json.dumps({"seconds": seconds}))
    elif side.is_file():
        seconds = json.loads(side.read_text()).get("seconds")
    why = _ir_matches(ir, row)
    if why is not None:
        raise RuntimeError(f"{ir}: not the {row.key} configuration: {why}")
    lower_onnx(load_ir(ir), out, accuracy_level=0)
    return {"quantize_seconds": seconds, "ir": str(ir)}


def speed_phase(cache: Path, bucket: dict[str, Any], rounds: int) -> None:
    """Re-measure decode speed of every measured row round-robin (``rounds`` times, one timed
    run each after a warm-up), so load changes on the shared machine hit all rows alike; keeps
    each row's best, in place of the per-row figures."""
    from qexport.eval import load_eval_text
    prompt = load_eval_text(WIKI, _tokenizer_files(cache / "fp.onnx")).ids[-PROMPT:]
    jobs = [(row, acc) for row in ROWS if row.key in bucket and "error" not in bucket[row.key]
            for acc in ((None,) if row.tool == "fp" else (0, 4))]
    best: dict[tuple[str, Any], dict[str, float]] = {}
    load = [os.getloadavg()[0]]
    for rnd in range(rounds):
        print(f"   speed round {rnd + 1}/{rounds}", flush=True)
        load.append(os.getloadavg()[0])
        for row, acc in jobs:
            folder = cache / ("fp.onnx" if row.tool == "fp" else f"{row.key}.onnx")
            sp = decode_speed(folder, acc, prompt, repeats=1)
            old = best.setdefault((row.key, acc), sp)
            for k, v in sp.items():
                old[k] = max(old[k], v)
    for (key, acc), sp in best.items():
        tag = "" if acc is None else f"_acc{acc}"
        bucket[key].update({f"{k}{tag}": v for k, v in sp.items()})
        bucket[key]["speed_rounds"] = rounds
        bucket[key]["speed_load"] = round(max(load), 2)


def measure(row: Row, cache: Path, windows: int, reuse: dict[str, Path],
            results: dict[str, Any]) -> dict[str, Any]:
    """Build (or reuse) the row's ONNX folder; perplexity and speed; cached per step."""
    fp_dir = cache / "fp.onnx"
    folder = fp_dir if row.tool == "fp" else cache / f"{row.key}.onnx"
    art = results.setdefault("artifacts", {})
    if not (folder / "model.onnx").is_file():
        print(f"   building {folder.name}", flush=True)
        if row.tool == "fp":
            build_fp(folder)
            art[row.key] = {"quantize_seconds": None}
        elif row.tool == "ort":
            art[row.key] = ort_row(row, fp_dir, folder)
        else:
            art[row.key] = qexport_quantize(row, cache, folder, reuse)
    res = {"label": row.label, **art.get(row.key, {}), **weight_stats(folder)}
    tok = _tokenizer_files(fp_dir)
    res.update(perplexity_ort(folder, windows, WIKI, tok))
    from qexport.eval import load_eval_text
    prompt = load_eval_text(WIKI, tok).ids[-PROMPT:]     # the text's end, not a scored window
    for acc in ((None,) if row.tool == "fp" else (0, 4)):
        sp = decode_speed(folder, acc, prompt)
        tag = "" if acc is None else f"_acc{acc}"
        res.update({f"{k}{tag}": v for k, v in sp.items()})
    return res


def run_check(cache: Path) -> dict[str, Any]:
    """``check_ort_gptq`` on the first calibration window, block 32 asymmetric."""
    import onnx
    from bench_onnx_peer import check_ort_gptq
    fp = cache / "fp.onnx"
    if not (fp / "model.onnx").is_file():
        build_fp(fp)
    res = check_ort_gptq(onnx.load(str(fp / "model.onnx")), onnx.load(str(fp / "model.onnx")),
                         calib_reader(fp, 1)[0], 32, False)
    res["summary"] = (f"on 1 calibration window, block 32 asym: {res.get('differ')} of "
                      f"{res.get('tensors')} MatMulNBits initializers differ")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / ".cache" / "bench_onnx"))
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings of row keys (fp is always measured)")
    ap.add_argument("--quick", action="store_true", help="8 evaluation windows (not 80)")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--redo", action="store_true", help="re-measure (artifacts are kept)")
    ap.add_argument("--reuse-ir", action="append", default=[], metavar="ROW=IR",
                    help="use an existing qexport IR for a row (its provenance is checked)")
    ap.add_argument("--md", default=None, help="markdown output [docs/bench/onnx.md; "
                                               "--quick: OUT/onnx-quick.md]")
    ap.add_argument("--check-ort-gptq", action="store_true",
                    help="compare the one-pass ORT GPTQ with onnxruntime's unmodified driver "
                         "on one calibration sample (about 10 minutes)")
    ap.add_argument("--speed-rounds", type=int, default=0, metavar="N",
                    help="after the rows, re-measure decode speed of all rows round-robin N "
                         "times and keep each row's best (fairer under changing load)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    import torch
    torch.set_num_threads(THREADS)
    cache = Path(a.out)
    cache.mkdir(parents=True, exist_ok=True)
    windows = a.windows or (8 if a.quick else 80)
    reuse = dict((k, Path(v)) for k, v in (x.split("=", 1) for x in a.reuse_ir))
    rf = cache / "results.json"
    results = json.loads(rf.read_text()) if rf.is_file() else {}
    bucket = results.setdefault(f"windows={windows}", {})
    if a.check_ort_gptq and "check_ort_gptq" not in results:
        results["check_ort_gptq"] = run_check(cache)
        rf.write_text(json.dumps(results, indent=1))
    for row in ROWS:
        if a.only and row.key != "fp" and not any(x in row.key for x in a.only.split(",")):
            continue
        if row.key in bucket and not a.redo and "error" not in bucket[row.key]:
            continue
        print(f"== {row.key}", flush=True)
        try:
            bucket[row.key] = measure(row, cache, windows, reuse, results)
        except Exception as e:      # noqa: BLE001 - a failing peer/config is a result to report
            bucket[row.key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rf.write_text(json.dumps(results, indent=1))
        print(json.dumps(bucket[row.key]), flush=True)
    if a.speed_rounds:
        speed_phase(cache, bucket, a.speed_rounds)
        rf.write_text(json.dumps(results, indent=1))
    same = {}
    for tag in ("b32-asym", "b128-sym"):
        a_, b_ = cache / f"qexport-rtn-{tag}.onnx", cache / f"ort-rtn-{tag}.onnx"
        if (a_ / "model.onnx").is_file() and (b_ / "model.onnx").is_file():
            from bench_onnx_peer import same_initializers
            same[tag] = same_initializers(str(a_ / "model.onnx"), str(b_ / "model.onnx"))
    results["identical_rtn"] = same
    rf.write_text(json.dumps(results, indent=1))
    md = table(bucket, ROWS)
    out_md = Path(a.md) if a.md else (cache / "onnx-quick.md" if windows != 80
                                      else REPO / "docs" / "bench" / "onnx.md")
    write_report(out_md, md, bucket, windows, targets(bucket, ROWS, best_ort),
                 results.get("check_ort_gptq"), same)
    print(md)


if __name__ == "__main__":
    main()
