"""Run under .venv-vllm: full-vocabulary prompt log-probabilities of several model folders.

usage: python vllm_logprobs.py JOB.json
JOB = {"models": [{"key": str, "path": str, "dtype": "float16", "lora": null | path}],
       "prompt_ids": [int], "vocab": int, "out": "result.npz"}
Writes ``out`` with one ``[len(prompt)-1, vocab]`` float64 array per key (row i = the
distribution predicting prompt token i+1) and ``<key>__error`` strings for models that failed.
Run with VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine stays in this process.
"""
import json
import sys
import time

import numpy as np


def _matrix(prompt_logprobs, vocab: int) -> np.ndarray:
    rows = []
    for d in prompt_logprobs[1:]:
        v = np.full(vocab, -np.inf)
        for tok, lp in d.items():
            v[tok] = lp.logprob
        rows.append(v)
    return np.stack(rows)


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    t0 = time.time()
    from vllm import LLM, SamplingParams
    print(f"import vllm {time.time() - t0:.1f}s", flush=True)
    vocab, ids = job["vocab"], job["prompt_ids"]
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=vocab, logprobs=1)
    res = {}
    for m in job["models"]:
        t1 = time.time()
        try:
            kw = dict(model=m["path"], dtype=m.get("dtype", "float16"), max_model_len=128,
                      max_num_seqs=1, enforce_eager=True, max_logprobs=vocab,
                      logprobs_mode="raw_logprobs", seed=0)
            req = None
            if m.get("lora"):
                from vllm.lora.request import LoRARequest
                kw.update(enable_lora=True, max_lora_rank=m.get("max_lora_rank", 16), max_loras=1)
                req = LoRARequest("lorc", 1, m["lora"])
            llm = LLM(**kw)
            out = llm.generate([{"prompt_token_ids": ids}], sp, lora_request=req)[0]
            res[m["key"]] = _matrix(out.prompt_logprobs, vocab)
            del llm
        except Exception as e:  # recorded for the test to report, not hidden
            res[m["key"] + "__error"] = np.array(f"{type(e).__name__}: {e}"[:2000])
        print(f"{m['key']}: {time.time() - t1:.1f}s", flush=True)
    np.savez(job["out"], **res)


if __name__ == "__main__":
    main()
