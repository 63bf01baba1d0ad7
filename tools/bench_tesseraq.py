"""Time TesseraQ per decoder block on the sample model (SmolLM2-135M) and report block losses.

    python tools/bench_tesseraq.py [--blocks 2] [--spec affine-w3g32a] [--iterations N] ...

Calibration: c4.utf8 from the shared data folder, 128 x 512 tokens (seed 0) unless told
otherwise. Prints, per block, wall and CPU seconds (AWQ / training / total) and the block-output
losses of min-max RTN, AWQ+RTN and TesseraQ, then an estimate for all blocks. ``--holdout N``
also prints the chained block losses of the exported blocks on N held-out windows of 512 tokens
from the tail of wiki.test.raw (from token 200000 on, past the 80 evaluation windows of DESIGN
§7): calibration losses alone reward overfitting the 128 calibration windows.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qexport.calib import load_calibration
from qexport.eval import load_eval_text
from qexport.methods.tesseraq.block import block_loss
from qexport.model.forward import build_causal_lm
from qexport.methods.tesseraq import TesseraQOptions, tesseraq_quantize_model
from qexport.model import load_model
from qexport.specs import TensorPlan, resolve_spec

HOLDOUT_START = 200_000
DATA = Path(os.environ.get("QEXPORT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def holdout_losses(src, tensors: dict, updates: dict, n: int, blocks: int) -> list[float]:
    """Chained block losses (FP target, quantized chain input, FP embeddings) of the first
    ``blocks`` blocks on ``n`` wiki windows of 512 tokens after :data:`HOLDOUT_START`."""
    sd = src.state_dict()
    return _chained(src, sd, {**sd, **updates,
                              **{k: qt.dequantize() for k, qt in tensors.items()}}, n, blocks)


def _chained(src, sd: dict, q_sd: dict, n: int, blocks: int) -> list[float]:
    """Chained block losses of the model ``q_sd`` against the FP model ``sd`` (state dicts)."""
    text = load_eval_text(DATA / "data" / "wikitext-2-raw" / "wiki.test.raw", src.tokenizer)
    x = torch.as_tensor(text.ids[HOLDOUT_START:HOLDOUT_START + n * 512]).view(n, 512)
    fp, q = build_causal_lm(src.config, sd), build_causal_lm(src.config, q_sd)
    rope = fp.rotary(512)
    out = []
    with torch.no_grad():
        h_fp, h_q = fp.embed(x), fp.embed(x)
        for i in range(blocks):
            h_fp, h_q = fp.layers[i](h_fp, rope), q.layers[i](h_q, rope)
            out.append(float(block_loss(h_fp, h_q)))
    return out


def score_ir(src, path: str, n: int, blocks: int) -> None:
    """Print :func:`holdout_losses` of an IR's blocks (its quantized linears and its updated
    norms; the source's FP embedding, as TesseraQ calibrates)."""
    from qexport.irio import load_ir
    sd = src.state_dict()
    ir = load_ir(path).state_dict()
    ir.pop("model.embed_tokens.weight", None)
    ir.pop("lm_head.weight", None)
    held = _chained(src, sd, {**sd, **ir}, n, blocks)
    print(f"{path}: held-out chained block losses: " + " ".join(f"{v:.4g}" for v in held))


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
    ap.add_argument("--holdout", type=int, default=0, metavar="N",
                    help="held-out wiki windows for chained block losses [default: 0 = none]")
    ap.add_argument("--score-ir", metavar="IR",
                    help="only print the --holdout losses of the first --blocks blocks of this "
                         "IR folder (e.g. a LeanQuant one), with FP embeddings")
    ap.add_argument("--lorc-rank", type=int, default=0,
                    help="LoRC factors of this rank (placed per --set lorc=...); the losses and "
                         "held-out losses then include them")
    ap.add_argument("--lorc-weight", default="none", choices=["none", "hessian"])
    ap.add_argument("--json", help="write the stats here")
    a = ap.parse_args()
    src = load_model(a.model)
    if a.score_ir:
        score_ir(src, a.score_ir, a.holdout or 4, a.blocks)
        return
    samples, _ = load_calibration(a.calib, src.tokenizer, a.n_samples, a.seq_len, seed=0)
    opts = TesseraQOptions()
    for kv in a.set:
        k, _, v = kv.partition("=")
        setattr(opts, k, json.loads(v))
    spec = resolve_spec(a.spec)
    plan = {n: TensorPlan(spec) for n in src.linear_names()}
    t0 = time.perf_counter()
    tensors, updates, stats = tesseraq_quantize_model(src, plan, samples, opts,
                                                      max_blocks=a.blocks,
                                                      lorc_rank=a.lorc_rank,
                                                      lorc_weight=a.lorc_weight)
    wall = time.perf_counter() - t0
    for b in stats["blocks"]:
        print(f"block {b['layer']:2d}: wall {b['seconds']:6.1f}s (awq {b['seconds_awq']:.1f}, "
              f"train {b['seconds_train']:.1f}) cpu {b['cpu_seconds']:6.1f}s | loss rtn "
              f"{b['loss_rtn']:.4g} awq+rtn {b['loss_awq_rtn']:.4g} tesseraq {b['loss_final']:.4g}"
              + (f" (LoRC tuning: {b['lorc_losses'][0]:.4g} -> {b['lorc_losses'][-1]:.4g})"
                 if "lorc_losses" in b else ""))
    per = sum(b["seconds"] for b in stats["blocks"]) / len(stats["blocks"])
    print(f"total {wall:.1f}s; mean {per:.1f}s/block -> {per * src.arch.n_layers / 60:.1f} min for "
          f"{src.arch.n_layers} blocks (torch threads {opts.threads})")
    if a.holdout:
        held = holdout_losses(src, tensors, updates, a.holdout, a.blocks)
        stats["holdout_losses"] = held
        print("held-out chained block losses: " + " ".join(f"{v:.4g}" for v in held))
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
