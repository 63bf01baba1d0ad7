"""qexport against llm-compressor's GPTQ W4A16 recipe, perplexity measured in vLLM (issue 6).

    .venv/bin/python tools/bench_vllm.py                 # every row; measured rows are skipped
    .venv/bin/python tools/bench_vllm.py --rows fp llmc  # only these rows
    .venv/bin/python tools/bench_vllm.py --report        # rewrite docs/bench/vllm.md from the cache

Needs ``.venv-vllm`` (tools/setup_vllm.sh) and ``.venv-llmc`` (tools/setup_llmc.sh). All rows
start from the same fp32 weights (the sample model's dequantized Q4_1 values, written as an HF
folder by ``samples/sample_to_hf.py``), use the same calibration windows (128 x 512 tokens of
``c4.utf8``, seed 0, drawn by ``qexport.calib.load_calibration``; llm-compressor gets them as a
dataset of input_ids) and land in the same format: compressed-tensors ``pack-quantized``, 4-bit
symmetric, group ``--group-size`` (64: the sample's 576-column rows cannot hold group 128 in
compressed-tensors, which both tools refuse), embeddings and lm_head unquantized.

Perplexity (DESIGN §7): the first 80 non-overlapping windows of 512 tokens of wikitext-2
``wiki.test.raw`` (tokenized by qexport, as ``qexport eval`` does), each window one prompt to
vLLM CPU (``tools/bench_vllm_ppl.py``: teacher-forced prompt log-probabilities, fp16), scored as
"all targets" and "second half". The FP row is the unquantized fp32 folder run by vLLM in fp16.

Results are cached row by row in ``.cache/bench_vllm/results.json`` (a measured stage is skipped
unless ``--redo``), and the table is written to ``docs/bench/vllm.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
CALIB = SHARED / "data" / "exllamav2-cal" / "c4.utf8"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CACHE = REPO / ".cache" / "bench_vllm"
DOC = REPO / "docs" / "bench" / "vllm.md"
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
LLMC_PY = REPO / ".venv-llmc" / "bin" / "python"
MODEL = "sample:smollm2"
N_SAMPLES, SEQ_LEN, CTX, WINDOWS = 128, 512, 512, 80
#: the FP perplexity (all / second half) of qexport's own fp32 forward, samples/README.md
FP_QEXPORT = (29.467, 23.609)

#: row key -> (label, qexport convert options or None for FP / "llmc" for llm-compressor)
ROWS: dict[str, tuple[str, list[str] | str | None]] = {
    "fp": ("FP (dequantized Q4_1 source, fp32 folder)", None),
    "llmc": ("llm-compressor GPTQ W4A16 (its defaults: static act-order, damp 0.01)", "llmc"),
    "qx_gptq": ("qexport gptq (defaults: attention-weighted v_proj Hessian, act-order)",
                ["--method", "gptq"]),
    "qx_gptq_ref": ("qexport gptq, reference (--v-hessian plain --no-act-order)",
                    ["--method", "gptq", "--v-hessian", "plain", "--no-act-order"]),
    "qx_leanquant": ("qexport leanquant (p 2, damp 0.1, act-order)", ["--method", "leanquant"]),
}


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd: list[str], log: Path, threads: int) -> tuple[int, float]:
    """Run ``cmd`` at ``nice 19`` (stdout+stderr to ``log``); return (exit code, wall s)."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(["nice", "-n", "19", *cmd], stdout=f, stderr=subprocess.STDOUT,
                            cwd=REPO, env=_env(threads)).returncode
    return rc, time.time() - t0


def _fail(what: str, rc: int, log: Path) -> None:
    raise SystemExit(f"{what} failed (exit {rc}); last lines of {log}:\n"
                     + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))


def prepare_inputs() -> tuple[Path, Path, Path, dict]:
    """The FP HF folder, calibration ids ``[128, 512]`` and evaluation windows ``[80, 512]``
    (int64 .npy), written once into the cache; returns them and their provenance."""
    fp_dir, calib_npy, win_npy = CACHE / "fp-hf", CACHE / "calib.npy", CACHE / "windows.npy"
    meta_path = CACHE / "inputs.json"
    if fp_dir.is_dir() and calib_npy.is_file() and win_npy.is_file() and meta_path.is_file():
        return fp_dir, calib_npy, win_npy, json.loads(meta_path.read_text())
    sys.path.insert(0, str(REPO / "samples"))
    from sample_to_hf import export_hf

    from qexport.calib import load_calibration
    from qexport.eval import load_eval_text
    from qexport.model import load_model

    if not fp_dir.is_dir():
        export_hf(MODEL, fp_dir)
    tok = load_model(MODEL).tokenizer
    samples, info = load_calibration(CALIB, tok, N_SAMPLES, SEQ_LEN, seed=0)
    np.save(calib_npy, samples.numpy().astype(np.int64))
    ev = load_eval_text(WIKI, tok)
    win = ev.ids[:WINDOWS * CTX].reshape(WINDOWS, CTX).copy()
    if ev.bos_id is not None:
        win[:, 0] = ev.bos_id
    np.save(win_npy, win)
    meta = {"calibration": info, "eval": {"file": WIKI.name, "sha256": ev.sha256,
                                          "windows": WINDOWS, "ctx": CTX,
                                          "bos": ev.bos_id is not None}}
    meta_path.write_text(json.dumps(meta, indent=1))
    return fp_dir, calib_npy, win_npy, meta


def quantize(key: str, fp_dir: Path, calib_npy: Path, group: int, threads: int) -> dict:
    """Produce row ``key``'s compressed-tensors folder; returns its quantize record."""
    out, log = CACHE / key, CACHE / f"{key}.quantize.log"
    spec = ROWS[key][1]
    if spec == "llmc":
        if not LLMC_PY.is_file():
            raise SystemExit(f"{LLMC_PY} absent: run tools/setup_llmc.sh")
        cmd = [str(LLMC_PY), str(REPO / "tools" / "bench_vllm_llmc.py"), str(fp_dir),
               str(calib_npy), str(out), "--group-size", str(group), "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "qexport.cli", "convert", MODEL, "--to", "vllm",
               "--bits", "4", "--group-size", str(group), "--sym", *spec, "--calib", str(CALIB),
               "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN), "--seed", "0",
               "-o", str(out), "--force", "--quiet"]
    # an interrupted qexport run left its finished layers here: continue it (byte-identical)
    resumed = spec != "llmc" and (CACHE / f"{key}.partial" / "manifest.json").is_file()
    if resumed:
        cmd.append("--resume")
    rc, wall = _run(cmd, log, threads)
    if rc != 0:
        _fail(f"quantize {key}", rc, log)
    rec = {"command": " ".join(cmd[1:]), "quantize_seconds": round(wall, 1), "resumed": resumed,
           "load_avg_1m_end": round(os.getloadavg()[0], 1)}
    if spec == "llmc":
        rec.update(json.loads((out / "llmc_run.json").read_text()))
    rec.update(bits_per_weight(out))
    return rec


_DTYPE_BITS = {"I32": 32, "I8": 8, "U8": 8, "F16": 16, "BF16": 16, "F32": 32}


def bits_per_weight(folder: Path) -> dict:
    """Bits per weight of the quantized linears of a compressed-tensors folder, counting codes
    (``num_bits``), one scale per group at 16 bits (vLLM holds them in the fp16 model dtype)
    and zero points if stored; plus the scale dtype as stored in the file."""
    from safetensors import safe_open

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (grp,) = qc["config_groups"].values()
    nb = int(grp["weights"]["num_bits"])
    codes = scale_bits = 0
    stored = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if name.endswith(".weight_shape"):
                    rows, cols = (int(x) for x in st.get_tensor(name).tolist())
                    codes += rows * cols
                elif name.endswith(".weight_scale"):
                    sl = st.get_slice(name)
                    scale_bits += 16 * math.prod(sl.get_shape())
                    stored.add(sl.get_dtype())
                elif name.endswith(".weight_zero_point"):  # packed int32: stored bits
                    sl = st.get_slice(name)
                    scale_bits += _DTYPE_BITS[sl.get_dtype()] * math.prod(sl.get_shape())
    if not codes:
        raise SystemExit(f"{folder}: no compressed-tensors weight_shape tensors found")
    return {"bpw": round((nb * codes + scale_bits) / codes, 4), "quantized_weights": codes,
            "scale_dtype_stored": sorted(stored)}


def perplexity(key: str, folder: Path, win_npy: Path, threads: int) -> dict:
    """Run vLLM on the windows; returns PPL all targets / second half and timings."""
    if not VLLM_PY.is_file():
        raise SystemExit(f"{VLLM_PY} absent: run tools/setup_vllm.sh")
    nll_npy, log = CACHE / f"{key}.nll.npy", CACHE / f"{key}.ppl.log"
    cmd = [str(VLLM_PY), str(REPO / "tools" / "bench_vllm_ppl.py"), str(folder), str(win_npy),
           str(nll_npy)]
    rc, wall = _run(cmd, log, threads)
    if rc != 0:
        _fail(f"vLLM perplexity of {key}", rc, log)
    nll = np.load(nll_npy)
    half = CTX // 2
    timing = json.loads(nll_npy.with_suffix(".json").read_text())
    return {"ppl_all": float(np.exp(nll.mean())),
            "ppl_second_half": float(np.exp(nll[:, half - 1:].mean())),
            "tokens_scored": int(nll.size), "ppl_wall_seconds": round(wall, 1),
            "vllm": timing}


def _load_results() -> dict:
    p = CACHE / "results.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_row(key: str, row: dict, inputs: dict) -> None:
    """Merge one row (and the inputs' provenance) into results.json, re-reading it first so
    that two runs measuring different rows do not overwrite each other's."""
    p = CACHE / "results.json"
    res = _load_results()
    res["_inputs"] = inputs
    res[key] = row
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(p)


def measure(keys: list[str], group: int, threads: int, redo: bool) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    fp_dir, calib_npy, win_npy, meta = prepare_inputs()
    inputs = dict(meta, group_size=group)
    for key in keys:
        row = {} if redo else _load_results().get(key, {})
        if row.get("group_size", group) != group:
            row = {}
        row.update(label=ROWS[key][0], group_size=group)
        folder = fp_dir if ROWS[key][1] is None else CACHE / key
        if ROWS[key][1] is not None and "quantize_seconds" not in row:
            print(f"[{key}] quantizing ...", flush=True)
            row.update(quantize(key, fp_dir, calib_npy, group, threads))
            _save_row(key, row, inputs)
        if "ppl_all" not in row:
            print(f"[{key}] vLLM perplexity ...", flush=True)
            row.update(perplexity(key, folder, win_npy, threads))
            _save_row(key, row, inputs)
        print(f"[{key}] PPL {row['ppl_all']:.3f} / {row['ppl_second_half']:.3f}", flush=True)
    return _load_results()


def _fmt_ratio(d: float | None, ref: float | None) -> str:
    if d is None or ref is None or ref <= 0:
        return "–"
    return f"{d / ref:.2f}"


def table(res: dict) -> str:
    """The markdown table: one line per row of :data:`ROWS` (unmeasured rows say so)."""
    fp = res.get("fp", {})
    llmc = res.get("llmc", {})
    d_ref = (llmc["ppl_all"] - fp["ppl_all"]) if "ppl_all" in llmc and "ppl_all" in fp else None
    d_ref2 = (llmc["ppl_second_half"] - fp["ppl_second_half"]
              if "ppl_all" in llmc and "ppl_all" in fp else None)
    lines = ["| row | bits/weight | PPL all | PPL 2nd half | ΔPPL all | ΔPPL 2nd half | "
             "ΔPPL ratio vs llm-compressor (all / 2nd half) | quantize wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, (label, spec) in ROWS.items():
        r = res.get(key, {})
        if "ppl_all" not in r:
            lines.append(f"| {label} | – | not measured yet | | | | | |")
            continue
        bpw = "16 (fp16 in vLLM)" if spec is None else f"{r['bpw']:.3f}"
        if key == "fp" or "ppl_all" not in fp:
            d = d2 = None
        else:
            d, d2 = r["ppl_all"] - fp["ppl_all"], r["ppl_second_half"] - fp["ppl_second_half"]
        wall = "–" if spec is None else f"{r['quantize_seconds']:.0f}"
        if spec == "llmc":
            wall += f" (oneshot {r['oneshot_seconds']:.0f})"
        if r.get("resumed"):
            wall += " (resumed run: last part only)"
        ds = "–" if d is None else f"{d:+.3f}"
        ds2 = "–" if d2 is None else f"{d2:+.3f}"
        ratio = "–" if key in ("fp", "llmc") else \
            f"{_fmt_ratio(d, d_ref)} / {_fmt_ratio(d2, d_ref2)}"
        lines.append(f"| {label} | {bpw} | {r['ppl_all']:.3f} | {r['ppl_second_half']:.3f} | "
                     f"{ds} | {ds2} | {ratio} | {wall} |")
    return "\n".join(lines) + "\n"


def verdict(res: dict) -> str:
    """One line per qexport row: met / not met against the issue's 0.7x target."""
    fp, llmc = res.get("fp", {}), res.get("llmc", {})
    if "ppl_all" not in fp or "ppl_all" not in llmc:
        return "Target (qexport ΔPPL ≤ 0.7 × llm-compressor's): not evaluated yet.\n"
    ref = llmc["ppl_all"] - fp["ppl_all"]
    out = []
    for key in ("qx_gptq", "qx_gptq_ref", "qx_leanquant"):
        r = res.get(key, {})
        if "ppl_all" not in r:
            out.append(f"- {key}: not measured yet")
            continue
        ratio = (r["ppl_all"] - fp["ppl_all"]) / ref
        out.append(f"- {ROWS[key][0]}: ΔPPL ratio {ratio:.2f} (all targets) → "
                   f"{'**met**' if ratio <= 0.7 else '**not met**'}")
    return "Target (qexport ΔPPL ≤ 0.7 × llm-compressor's, all targets):\n\n" + \
        "\n".join(out) + "\n"


def write_doc(res: dict) -> None:
    """Write docs/bench/vllm.md: the setup (from the cached provenance), table and verdict."""
    inp = res.get("_inputs", {})
    cal, ev = inp.get("calibration", {}), inp.get("eval", {})
    g = inp.get("group_size", 64)
    v = res.get("llmc", {}).get("versions", {})
    lc = (f"{v.get('llmcompressor', '0.14.0.1')} (compressed-tensors "
          f"{v.get('compressed-tensors', '0.19.0')}, torch {v.get('torch', '2.13.0+cpu')}, "
          f"transformers {v.get('transformers', '5.17.0')})")
    calib = (f"{cal.get('n_samples', N_SAMPLES)} × {cal.get('seq_len', SEQ_LEN)} tokens of "
             f"`{cal.get('file', CALIB.name)}`, seed {cal.get('seed', 0)}, hash "
             f"`{str(cal.get('hash', ''))[:12]}…`")
    evtxt = (f"the first {ev.get('windows', WINDOWS)} non-overlapping windows of "
             f"{ev.get('ctx', CTX)} tokens of wikitext-2 `wiki.test.raw` (sha256 "
             f"`{str(ev.get('sha256', ''))[:8]}…`, tokenized by qexport, BOS "
             f"{'inserted' if ev.get('bos') else 'not inserted'})")
    fp = res.get("fp", {})
    fp_check = "the FP row is not measured yet." if "ppl_all" not in fp else (
        f"the FP row through vLLM fp16 ({fp['ppl_all']:.3f} / {fp['ppl_second_half']:.3f}) "
        f"against qexport's own fp32 forward (`qexport eval`, samples/README.md: "
        f"{FP_QEXPORT[0]:.3f} / {FP_QEXPORT[1]:.3f}).")
    text = f"""# qexport vs llm-compressor in vLLM (issue 6)

Generated by `tools/bench_vllm.py` from its cache `.cache/bench_vllm/results.json`.

- **Model**: SmolLM2-135M-Instruct (`{MODEL}`), all 210 decoder linears quantized. Every row
  starts from the same fp32 weights: the GGUF's dequantized Q4_1 values, written as an HF
  folder by `samples/sample_to_hf.py`. Embeddings and the tied lm_head stay unquantized.
- **Format**: compressed-tensors `pack-quantized`, 4-bit symmetric, **group {g}**. This is the
  W4A16 recipe with its group size changed from 128, because hidden 576 = 4.5 × 128 and
  compressed-tensors requires the group to divide the row (llm-compressor raises "tensor
  column shape must be divisble by the given group_size"; qexport's vLLM target refuses too).
- **Calibration**: {calib} (`qexport.calib.load_calibration`). Both tools get the same token
  windows; llm-compressor gets them as a dataset of `input_ids`, without shuffling.
- **llm-compressor** {lc}, in `.venv-llmc` (`tools/setup_llmc.sh`): `oneshot` with
  `GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])`, group size overridden,
  everything else its defaults (block 128, dampening 0.01, static act-order, memoryless min-max
  observer, sequential pipeline). It runs on CPU with the model in fp32, so it stores fp32
  scales; vLLM casts them to fp16 at load. Bits/weight counts every scale at 16 bits, as it runs.
- **qexport**: `qexport convert {MODEL} --to vllm --bits 4 --group-size {g} --sym --method M
  --calib c4.utf8` plus the row's options.
- **Perplexity**: vLLM-CPU 0.32.0 (`.venv-vllm`), dtype float16, on {evtxt}. Each window is one
  prompt; teacher-forced `prompt_logprobs` give each token's log-probability
  (`tools/bench_vllm_ppl.py`). "All" scores targets 1..511 of each window and "2nd half"
  targets 256..511 (DESIGN §7). ΔPPL is measured against the FP row, run the same way.
  Cross-check: {fp_check}
- **Wall times** cover the whole command (load, calibrate, quantize, pack, save), run at
  `nice -n 19` with 2 threads on the shared 2-core machine while other jobs ran. They are
  upper bounds, not a speed comparison.

{table(res)}
{verdict(res)}"""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="re-measure the selected rows")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args()
    res = _load_results() if args.report else \
        measure(args.rows, args.group_size, args.threads, args.redo)
    write_doc(res)
    print(table(res))
    print(verdict(res))


if __name__ == "__main__":
    main()
