"""Measurements of tools/bench_onnx.py on an ONNX folder: bits per weight and size, DESIGN §7
perplexity through onnxruntime, CPU decode speed with the KV cache.

Sessions: CPU EP, ``THREADS`` intra-op threads, spin-waiting off (so process CPU time is the
work done, whatever share of the shared machine the process gets).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["model_bytes", "weight_stats", "perplexity_ort", "decode_speed"]

THREADS = 2
NEW_TOKENS, REPEATS = 64, 3


def model_bytes(folder: Path, acc: int | None = None) -> bytes:
    """``model.onnx`` with its external data inlined; ``acc``: set every MatMulNBits node's
    accuracy_level (the same rewrite for every row)."""
    import onnx
    proto = onnx.load(str(folder / "model.onnx"))
    if acc is not None:
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                keep = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(keep + [onnx.helper.make_attribute("accuracy_level", acc)])
    return proto.SerializeToString()


def weight_stats(folder: Path) -> dict[str, Any]:
    """Bits per weight of the MatMulNBits linears as stored (B + scales + zero points over
    N*K), file size, and which zero-point kind the nodes carry."""
    import onnx
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    nbytes = lambda n: int(np.prod(inits[n].dims)) * {1: 4, 2: 1, 10: 2}[inits[n].data_type]
    bits = weights = 0
    zp = set()
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        weights += a["K"] * a["N"]
        bits += 8 * sum(nbytes(n) for n in node.input[1:4] if n)
        zp.add("none" if len(node.input) < 4 or not node.input[3] else
               {2: "uint8", 1: "float"}[inits[node.input[3]].data_type])
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    return {"bpw": round(bits / weights, 4) if weights else 32.0, "n_quantized": weights,
            "size_mib": round(size / 2**20, 1), "zero_points": sorted(zp)}


def _decoder(src: str | bytes) -> Any:
    """An OnnxDecoder over a CPU session with THREADS intra-op threads and no spin-waiting (so
    process CPU time is the work done, whatever share of the shared machine we get)."""
    import onnxruntime as ort
    from qexport.backends.onnx import OnnxDecoder
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    dec = OnnxDecoder.__new__(OnnxDecoder)          # OnnxDecoder's own fields, our session
    dec.sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    dec.provider = dec.sess.get_providers()[0]
    dec.past_inputs = [i for i in dec.sess.get_inputs() if i.name.startswith("past_key_values.")]
    dec.out_names = [o.name for o in dec.sess.get_outputs()]
    return dec


def perplexity_ort(folder: Path, windows: int, text_path: Path,
                   tok_files: dict[str, bytes]) -> dict[str, Any]:
    """DESIGN section 7 perplexity of an ONNX folder on ``text_path`` (first ``windows`` windows
    of 512) through onnxruntime (CPU, accuracy levels as stored)."""
    from qexport.eval import load_eval_text, perplexity
    dec = _decoder(str(folder / "model.onnx"))
    text = load_eval_text(text_path, tok_files)
    t0 = time.time()
    res = perplexity(lambda b: dec.logits(b.tolist()), text, ctx=512, n_windows=windows,
                     progress=False)
    return {"ppl_all": res["all_targets"], "ppl_second_half": res["second_half"],
            "windows": res["n_windows"], "eval_seconds": round(time.time() - t0, 1),
            "provider": dec.provider}


def decode_speed(folder: Path, acc: int | None, prompt: np.ndarray,
                 repeats: int = REPEATS) -> dict[str, float]:
    """Prefill ``prompt``, then ``NEW_TOKENS`` greedy steps with the KV cache; best of
    ``repeats`` (after one warm-up) by wall time and by process CPU time."""
    dec = _decoder(model_bytes(folder, acc))
    wall, cpu, pre = [], [], []
    for rep in range(repeats + 1):                  # the first round is a warm-up
        ids = prompt[None].astype(np.int64)
        t0 = time.perf_counter()
        lg, past = dec.run(ids, np.ones_like(ids), dec.empty_past(1))
        t1, c1 = time.perf_counter(), time.process_time()
        seq = ids.shape[1]
        for _ in range(NEW_TOKENS):
            tok = np.asarray([[int(np.argmax(lg[0, -1]))]], dtype=np.int64)
            seq += 1
            lg, past = dec.run(tok, np.ones((1, seq), np.int64), past)
        if rep:
            wall.append(time.perf_counter() - t1)
            cpu.append(time.process_time() - c1)
            pre.append(t1 - t0)
    return {"prefill_tok_s": round(len(prompt) / min(pre), 1),
            "decode_tok_s": round(NEW_TOKENS / min(wall), 2),
            "decode_tok_cpu_s": round(NEW_TOKENS / min(cpu), 2)}
