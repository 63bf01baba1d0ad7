"""Quick ablation of GPTQ's v_proj Hessian and act-order on the sample model (README Results).

Each configuration quantizes ``sample:smollm2`` in-process (``quantize_model``) with a small
calibration set (``--n-samples``, default 32 x 512 tokens of c4.utf8, seed 0) and measures
perplexity on the first ``--windows`` (default 16) windows of 512 of wikitext-2 test. Smaller
than ``tools/bench_quality.py``'s protocol (128 x 512 calibration, 80 windows), so its numbers
compare configurations with each other, not with that table. Results are appended as JSON
lines to ``--out`` (default .cache/bench_gptq_ablation.jsonl).

    .venv/bin/python tools/bench_gptq_ablation.py                  # all configurations
    .venv/bin/python tools/bench_gptq_ablation.py --only w3         # those whose tag has "w3"
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
#: tag -> (method, bits, group, sym, v_hessian, act_order)
CONFIGS = {
    "rtn-w4": ("rtn", 4, 128, True, "plain", False),
    "gptq-w4-plain": ("gptq", 4, 128, True, "plain", False),
    "gptq-w4-att": ("gptq", 4, 128, True, "attention", False),
    "gptq-w4-att-ao": ("gptq", 4, 128, True, "attention", True),
    "rtn-w3": ("rtn", 3, 128, False, "plain", False),
    "gptq-w3-att": ("gptq", 3, 128, False, "attention", False),
    "gptq-w3-att-ao": ("gptq", 3, 128, False, "attention", True),
}


def run(tag: str, n_samples: int, windows: int) -> dict:
    from qexport.commands import build_plan
    from qexport.eval import load_eval_text, perplexity
    from qexport.model.forward import build_causal_lm
    from qexport.model.load import load_model
    from qexport.pipeline import QuantizeOptions, quantize_model
    method, bits, gs, sym, vh, ao = CONFIGS[tag]
    src = load_model("sample:smollm2")
    plan, _ = build_plan(src, {"target": "ir", "bits": bits, "group_size": gs, "sym": sym,
                               "method": method})
    opts = QuantizeOptions(method=method, calib=str(SHARED / "data/exllamav2-cal/c4.utf8"),
                           n_samples=n_samples, seq_len=512, v_hessian=vh, act_order=ao,
                           progress=False)
    t0 = time.time()
    qm = quantize_model(src, plan, opts)
    seconds = time.time() - t0
    lm = build_causal_lm(src.config, qm.state_dict())
    ev = load_eval_text(SHARED / "data/wikitext-2-raw/wiki.test.raw", src.tokenizer)
    r = perplexity(lm, ev, n_windows=windows, progress=False)
    return {"tag": tag, "n_samples": n_samples, "windows": windows,
            "ppl": round(r["all_targets"], 3), "half": round(r["second_half"], 3),
            "quantize_s": round(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / ".cache" / "bench_gptq_ablation.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    for tag in CONFIGS:
        if a.only in tag:
            res = run(tag, a.n_samples, a.windows)
            print(json.dumps(res), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
