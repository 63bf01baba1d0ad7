"""Peak memory of ``qexport quantize --method gptq`` against model depth.

Builds synthetic random Llamas with the sample model's width (hidden 576, ffn 1536, 9 heads /
3 KV heads, vocab 49152, bf16 weights on disk) at several depths, quantizes each in a fresh
process, and samples the process's memory from ``/proc/PID/status`` every 20 ms:

| column      | meaning                                                                  |
|-------------|--------------------------------------------------------------------------|
| peak RSS    | ``VmHWM``: the kernel's high-water mark of resident memory                |
| peak anon   | largest ``RssAnon`` seen: heap memory (arrays, activations, QTensors)     |
| peak file   | largest ``RssFile`` seen: memory-mapped model files and libraries (page    |
|             | cache the kernel may drop; counted in RSS while mapped)                    |

The calibration set is small (``--n-samples 16 --seq-len 256`` by default) so the run is
quick and the activations (one layer's worth) are a small, constant part of the total.
``--sample`` adds the sample model (sample:smollm2, a Q4_1 GGUF, 30 layers); ``--export
TARGET`` also measures lowering each IR (``--export-only``: reuse the IRs already in --work).
Linux only.

    .venv/bin/python tools/bench_memory.py --layers 8 32 --work /tmp/qx-mem
    .venv/bin/python tools/bench_memory.py --layers 8 32 --work /tmp/qx-mem --export-only \
        --export vllm
    .venv/bin/python tools/bench_memory.py --layers --sample --n-samples 128 --seq-len 512 \
        --offload --work /tmp/qx-mem-off         # the sample model, activations in a file
    .venv/bin/python tools/bench_memory.py --layers 8 32 --method rtn --group-size 32 \
        --export gguf --work /tmp/qx-mem-rtn         # export only matters: a quick RTN IR
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

SHAPE = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
C4 = Path(__file__).resolve().parents[1].parent / "shared/data/exllamav2-cal/c4.utf8"


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_measured(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; return wall seconds and peak RSS / anon / file in MiB."""
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status_kib(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": time.time() - t0, "peak_rss": peak["VmHWM"] / 1024,
            "peak_anon": peak["RssAnon"] / 1024, "peak_file": peak["RssFile"] / 1024}


def calib_text(work: Path) -> Path:
    if C4.is_file():
        return C4
    p = work / "calib.txt"
    if not p.exists():
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        p.write_text("\n".join(open(f, errors="ignore").read() for f in files[:60]))
    return p


def make_model(work: Path, layers: int) -> Path:
    from qexport.testing import make_tiny_model, make_tokenizer_dir
    out = work / f"llama-576x{layers}"
    if (out / "config.json").is_file():
        return out
    tok = work / "tok"
    if not (tok / "tokenizer.model").is_file():
        make_tokenizer_dir(tok)
    return make_tiny_model(out, "llama", layers=layers, dtype="bfloat16", tokenizer_dir=tok,
                           **SHAPE)


def _dir_mib(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def _quantize_cmd(model: str, out: Path, calib: Path, args: argparse.Namespace) -> list[str]:
    calib_args = (["--calib", str(calib), "--n-samples", str(args.n_samples), "--seq-len",
                   str(args.seq_len)] if args.method != "rtn" else [])
    offload = ["--offload-activations"] if args.offload else []
    return [sys.executable, "-m", "qexport.cli", "quantize", model, "--method", args.method,
            "--bits", "4", "--group-size", str(args.group_size), "--sym", *calib_args,
            *offload, "-o", str(out), "--force", "--quiet"]


def _cases(args: argparse.Namespace) -> list[tuple[str, int, str, Path]]:
    """(label, layers, model argument, source path) for every model to measure."""
    cases = []
    if args.sample:
        from qexport.model.load import sample_path
        cases.append(("sample:smollm2 (Q4_1 GGUF)", 30, "sample:smollm2", sample_path("smollm2")))
    for n in args.layers:
        p = make_model(args.work, n)
        cases.append((f"random 576x{n} (bf16)", n, str(p), p))
    return cases


def _size_mib(p: Path) -> float:
    return p.stat().st_size / 2**20 if p.is_file() else _dir_mib(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--sample", action="store_true", help="also the sample model (30 layers)")
    ap.add_argument("--export", default=None, choices=["gguf", "onnx", "vllm"],
                    help="also measure `qexport export IR --to TARGET` of each IR")
    ap.add_argument("--export-only", action="store_true",
                    help="reuse the IRs of an earlier run in --work; measure only the export")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qexport-bench-memory"))
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64,
                    help="32 makes the IR exactly GGUF Q4_0 (for --export gguf)")
    ap.add_argument("--offload", action="store_true",
                    help="quantize with --offload-activations (activations in a $TMPDIR file)")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                    help="rtn: a quick IR for measuring --export alone")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    calib = calib_text(args.work)
    rows = []
    for label, n, model, path in _cases(args):
        off = "-offload" if args.offload else ""
        out = args.work / f"{label.split()[0].replace(':', '-')}-{n}{off}.qir"
        steps = [] if args.export_only else [("quantize", _quantize_cmd(model, out, calib, args))]
        if args.export:
            steps.append((f"export {args.export}", [
                sys.executable, "-m", "qexport.cli", "export", str(out), "--to", args.export,
                "-o", str(args.work / f"{out.stem}-{args.export}"), "--force"]))
        for step, cmd in steps:
            r = run_measured(cmd)
            r.update(label=label, layers=n, step=step, model_mib=_size_mib(path),
                     ir_mib=_dir_mib(out))
            rows.append(r)
            print(f"{label} {step}: {r}", file=sys.stderr, flush=True)
    print(f"\n{args.method} w4g{args.group_size}{' --offload-activations' if args.offload else ''}, calibration {args.n_samples}x{args.seq_len}; random "
          "models: hidden 576 / ffn 1536 / vocab 49152 (the sample model's shape)\n")
    print("| model | layers | step | source MiB | IR MiB | peak RSS MiB | peak anon MiB "
          "| peak file MiB | s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['layers']} | {r['step']} | {r['model_mib']:.0f} "
              f"| {r['ir_mib']:.0f} | {r['peak_rss']:.0f} | {r['peak_anon']:.0f} "
              f"| {r['peak_file']:.0f} | {r['seconds']:.0f} |")
    for step in dict.fromkeys(r["step"] for r in rows):
        rnd = [r for r in rows if r["step"] == step and r["label"].startswith("random")]
        if len(rnd) >= 2:
            a, b = rnd[0], rnd[-1]
            per = (b["peak_rss"] - a["peak_rss"]) / (b["layers"] - a["layers"])
            ir_per = (b["ir_mib"] - a["ir_mib"]) / (b["layers"] - a["layers"])
            print(f"\n{step}: peak RSS grows {per:.1f} MiB per extra layer (the IR grows "
                  f"{ir_per:.1f} MiB per layer)")


if __name__ == "__main__":
    main()
