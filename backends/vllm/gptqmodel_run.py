"""Run under .venv-gptqmodel (tools/setup_gptqmodel.sh): load GPTQ folders with transformers +
GPTQModel on CPU and dump what GPTQModel's kernel computes. Standalone: imports neither qexport
nor anything the main venv has that .venv-gptqmodel lacks.

usage: python gptqmodel_run.py JOB.json
JOB = {"models": [{"key": str, "path": str, "backend": "torch"}], "out": "result.npz",
       "eye": bool, "prompt_ids": [int] | null, "threads": 2}

``backend`` is GPTQModel's kernel (transformers' ``GPTQConfig(backend=...)``): ``"torch"`` is
``TorchLinear`` (2..8 bit, dequantization ``scales[g] * (q - z)`` in the scales' dtype, run
through torch.compile); ``"auto"`` is GPTQModel's own pick (on CPU, 4-bit: ``TorchAtenLinear``,
which casts scales and activations to bfloat16).

Writes ``out`` (npz, no pickle) with, per model ``key`` and quantized linear ``module``:
``key::module``: the module's ``dequantize_weight()`` as ``[out, in]`` float32 (its dtype widened
exactly); with ``eye``, ``key::module@fwd``: the module's forward on the identity matrix
(``x @ W`` with ``x = I``, so ``W`` again, through the kernel's matmul path), ``[out, in]``;
``key__kernels``: the kernel class names; ``key__deq_dtype``: the dtypes ``dequantize_weight``
returned (TorchLinear: its scales' dtype, float16 even in a bfloat16 model; its forward casts
that weight to the activations' dtype); ``key__dtype``: the model dtype; with ``prompt_ids``,
``key__logits``: the model's float32 logits ``[len, vocab]``; ``key__error``: why a model failed.
"""
import json
import os
import sys
import time

import numpy as np


def _f32(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    t0 = time.time()
    import torch
    torch.set_num_threads(int(job.get("threads", 2)))
    from transformers import AutoModelForCausalLM, GPTQConfig
    print(f"import {time.time() - t0:.1f}s", flush=True)
    res: dict[str, np.ndarray] = {}
    for m in job["models"]:
        t1, key = time.time(), m["key"]
        try:
            cfg = json.loads(open(os.path.join(m["path"], "config.json")).read())
            qc = cfg["quantization_config"]
            dtype = getattr(torch, cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
            model = AutoModelForCausalLM.from_pretrained(
                m["path"], device_map="cpu", dtype=dtype,
                quantization_config=GPTQConfig(bits=int(qc["bits"]),
                                               backend=m.get("backend", "torch"))).eval()
            kinds, deq = set(), set()
            with torch.no_grad():
                for name, mod in model.named_modules():
                    if not hasattr(mod, "dequantize_weight") or not hasattr(mod, "qweight"):
                        continue
                    kinds.add(type(mod).__name__)
                    # before any forward: TorchAtenLinear repacks its words on its first one
                    w = mod.dequantize_weight()
                    deq.add(str(w.dtype).replace("torch.", ""))
                    res[f"{key}::{name}"] = _f32(w.T)
                    if job.get("eye"):
                        eye = torch.eye(mod.in_features, dtype=dtype)
                        res[f"{key}::{name}@fwd"] = _f32(mod(eye).T)
                if job.get("prompt_ids"):
                    ids = torch.tensor([job["prompt_ids"]])
                    res[f"{key}__logits"] = _f32(model(ids).logits[0])
            res[f"{key}__kernels"] = np.array(sorted(kinds))
            res[f"{key}__deq_dtype"] = np.array(sorted(deq))
            res[f"{key}__dtype"] = np.array(str(dtype).replace("torch.", ""))
            del model
        except Exception as e:  # recorded for the caller to report, not hidden
            res[f"{key}__error"] = np.array(f"{type(e).__name__}: {e}"[:2000])
        print(f"{key}: {time.time() - t1:.1f}s", flush=True)
    np.savez(job["out"], **res)


if __name__ == "__main__":
    main()
