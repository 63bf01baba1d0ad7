"""Time TesseraQ per decoder block on the sample model (SmolLM2-135M) and report block losses.

    python tools/bench_tesseraq.py [--blocks 2] [--spec affine-w3g32a] [--iterations N] ...

Calibration: c4.utf8 from the shared data folder, 128 x 512 tokens (seed 0) unless told
otherwise. Prints, per block, wall and CPU seconds (AWQ / training / total) and the block-output
losses of min-max RTN, AWQ+RTN and TesseraQ, then an estimate for all blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qexport.calib import load_calibration
from qexport.methods.tesseraq import TesseraQOptions, tesseraq_quantize_model
from qexport.model import load_model
from qexport.specs import TensorPlan, resolve_spec

DATA = Path(os.environ.get("QEXPORT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sample:smollm2")
    ap.add_argument("--calib", default=str(DATA / "data" / "exllamav2-cal" / "c4.utf8"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--spec", default="affine-w3g32a")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=JSON",
                    help="override a TesseraQOptions field, e.g. --set iterations=20")
    ap.add_argument("--json", help="write the stats here")
    a = ap.parse_args()
    src = load_model(a.model)
    samples, _ = load_calibration(a.calib, src.tokenizer, a.n_samples, a.seq_len, seed=0)
    opts = TesseraQOptions()
    for kv in a.set:
        k, _, v = kv.partition("=")
        setattr(opts, k, json.loads(v))
    spec = resolve_spec(a.spec)
    plan = {n: TensorPlan(spec) for n in src.linear_names()}
    t0 = time.perf_counter()
    _, _, stats = tesseraq_quantize_model(src, plan, samples, opts, max_blocks=a.blocks)
    wall = time.perf_counter() - t0
    for b in stats["blocks"]:
        print(f"block {b['layer']:2d}: wall {b['seconds']:6.1f}s (awq {b['seconds_awq']:.1f}, "
              f"train {b['seconds_train']:.1f}) cpu {b['cpu_seconds']:6.1f}s | loss rtn "
              f"{b['loss_rtn']:.4g} awq+rtn {b['loss_awq_rtn']:.4g} tesseraq {b['loss_final']:.4g}")
    per = sum(b["seconds"] for b in stats["blocks"]) / len(stats["blocks"])
    print(f"total {wall:.1f}s; mean {per:.1f}s/block -> {per * src.arch.n_layers / 60:.1f} min for "
          f"{src.arch.n_layers} blocks (torch threads {opts.threads})")
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
