"""Per-token NLL of fixed token windows through vLLM (CPU), run under ``.venv-vllm``.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python tools/bench_vllm_ppl.py \
        MODEL_DIR WINDOWS.npy OUT.npy [--dtype float16]

``WINDOWS.npy``: int64 ``[n, ctx]`` (tools/bench_vllm.py cuts them from wiki.test.raw with
qexport's tokenizer, DESIGN §7). Each window is one prompt given as token ids (nothing is
added or removed); ``prompt_logprobs=1`` makes vLLM return, teacher-forced, the log-probability
of every prompt token under the model's full-vocabulary softmax of raw logits. Writes
``OUT.npy`` float64 ``[n, ctx-1]``: entry ``[w, t-1]`` = ``-log p(window[t] | window[:t])``,
the same layout as ``qexport.eval.window_nll``, and ``OUT.json`` with the timings.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    args = ap.parse_args()
    win = np.load(args.windows)
    n, ctx = win.shape
    t0 = time.time()
    from vllm import LLM, SamplingParams
    t_import = time.time() - t0
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=ctx + 8, enforce_eager=True,
              max_num_seqs=args.max_num_seqs, max_logprobs=1, logprobs_mode="raw_logprobs",
              enable_prefix_caching=False, seed=0)
    t_load = time.time() - t0 - t_import
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    prompts = [{"prompt_token_ids": [int(x) for x in row]} for row in win]
    t1 = time.time()
    outs = llm.generate(prompts, sp)
    t_gen = time.time() - t1
    nll = np.empty((n, ctx - 1), dtype=np.float64)
    for w, out in enumerate(outs):
        plp = out.prompt_logprobs
        if len(plp) != ctx or plp[0] is not None:
            raise SystemExit(f"window {w}: expected {ctx} prompt logprobs with None first "
                             f"(not {len(plp)}, first {plp[0]!r})")
        for t in range(1, ctx):
            nll[w, t - 1] = -plp[t][int(win[w, t])].logprob
    np.save(args.out, nll)
    info = {"import_s": round(t_import, 1), "load_s": round(t_load, 1),
            "generate_s": round(t_gen, 1), "dtype": args.dtype, "windows": n, "ctx": ctx}
    with open(args.out.removesuffix(".npy") + ".json", "w") as f:
        json.dump(info, f)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
