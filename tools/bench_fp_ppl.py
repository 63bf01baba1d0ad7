"""Full-precision perplexity of the sample model with qexport's own forward (a reference check).

Loads ``sample:smollm2`` (dequantized Q4_1 weights, fp32), evaluates the first 80 windows of 512
tokens of wikitext-2 ``wiki.test.raw`` (models-data.md §4.4) and compares with the reference
values measured with transformers: 29.4668 (all targets) / 23.6086 (second half).

    .venv/bin/python tools/bench_fp_ppl.py [--windows 80] [--threads 1] [--wiki PATH] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REFERENCE = {"all_targets": 29.4668, "second_half": 23.6086}
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_WIKI = SHARED / "data/wikitext-2-raw/wiki.test.raw"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sample:smollm2")
    ap.add_argument("--wiki", default=os.environ.get("QEXPORT_WIKI", str(DEFAULT_WIKI)))
    ap.add_argument("--windows", type=int, default=80)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="windows per forward")
    ap.add_argument("--tolerance", type=float, default=0.005, help="relative, vs the reference")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from qexport.eval import load_eval_text, perplexity
    from qexport.model import build_causal_lm, load_model

    t0 = time.time()
    src = load_model(args.model)
    lm = build_causal_lm(src.config, src.state_dict())
    text = load_eval_text(args.wiki, src.tokenizer)
    t_load = time.time() - t0
    t1 = time.time()
    res = perplexity(lm, text, ctx=args.ctx, n_windows=args.windows, batch_size=args.batch)
    res.update(model=args.model, text_tokens=int(text.ids.size), text_sha256=text.sha256,
               threads=args.threads, seconds_load=round(t_load, 1),
               seconds_eval=round(time.time() - t1, 1))
    ok = True
    if args.model == "sample:smollm2" and args.windows == 80 and args.ctx == 512:
        for k, ref in REFERENCE.items():
            rel = abs(res[k] / ref - 1)
            res[f"{k}_rel_err"] = rel
            ok &= rel <= args.tolerance
        res["matches_reference"] = ok
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
