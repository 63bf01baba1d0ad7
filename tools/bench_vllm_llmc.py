"""llm-compressor's GPTQ W4A16 recipe on an HF folder, run in .venv-llmc (tools/setup_llmc.sh).

    .venv-llmc/bin/python tools/bench_vllm_llmc.py MODEL_DIR CALIB.npy OUT_DIR [--group-size 64]

``CALIB.npy``: int64 ``[n_samples, seq_len]`` token windows (tools/bench_vllm.py writes them with
``qexport.calib.load_calibration``, so both quantizers see the same tokens). The recipe is
llm-compressor's ``GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])`` with its
own defaults (block 128, dampening 0.01, static act-order, min-max observer, sequential
pipeline); only ``group_size`` is overridden when it is not 128 (compressed-tensors refuses a
group that does not divide the row: 576 columns with group 128 raise "tensor column shape must
be divisble by the given group_size"). Output: ``save_pretrained(save_compressed=True)``
(compressed-tensors pack-quantized) plus the tokenizer files, and ``OUT_DIR/llmc_run.json``
with the wall seconds of ``oneshot`` alone and the package versions.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _recipe(group_size: int):
    """The GPTQ W4A16 modifier, group size ``group_size`` (128 = the preset unchanged)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    if group_size == 128:
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size, "dynamic": False}
    return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                        ignore=["lm_head"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.load(args.calib)
    if ids.ndim != 2 or ids.dtype != np.int64:
        raise SystemExit(f"{args.calib}: expected int64 [n, seq_len] (not {ids.dtype} {ids.shape})")
    n, seq = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=_recipe(args.group_size),
            num_calibration_samples=n, max_seq_length=seq, shuffle_calibration_samples=False)
    wall = time.time() - t0
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    info = {"oneshot_seconds": round(wall, 1), "n_samples": n, "seq_len": seq,
            "group_size": args.group_size, "threads": args.threads,
            "versions": {p: md.version(p) for p in
                         ("llmcompressor", "compressed-tensors", "torch", "transformers")}}
    (tmp / "llmc_run.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
