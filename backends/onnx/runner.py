"""Run an exported decoder with plain onnxruntime (prefill, KV-cache steps, greedy decoding), and
the transformers fp32 reference of a QModel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qexport.ir import QModel

from .session import make_session

__all__ = ["OnnxDecoder", "reference_model", "reference_logits"]

_ONNX_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxDecoder:
    """One onnxruntime session over ``model.onnx``; ``provider`` says which EP runs it."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        self.sess, self.provider = make_session(path, device, threads=threads)
        self.past_inputs = [i for i in self.sess.get_inputs()
                            if i.name.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors ``[B, kv_heads, 0, head_dim]``."""
        feeds = {}
        for i in self.past_inputs:
            kv, hd = i.shape[1], i.shape[3]
            feeds[i.name] = np.zeros((batch, kv, 0, hd), dtype=_ONNX_TO_NP[i.type])
        return feeds

    def run(self, ids: np.ndarray, mask: np.ndarray,
            past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: ``ids [B, T]``, ``mask [B, P+T]`` -> logits fp32 ``[B, T, V]``, next past."""
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 **past}
        outs = dict(zip(self.out_names, self.sess.run(self.out_names, feeds)))
        nxt = {k.replace("present.", "past_key_values."): v for k, v in outs.items()
               if k.startswith("present.")}
        return outs["logits"].astype(np.float32), nxt

    def logits(self, ids: list[list[int]]) -> np.ndarray:
        """Full-sequence logits (empty past) for equal-length sequences, fp32 ``[B, T, V]``."""
        a = np.asarray(ids, dtype=np.int64)
        return self.run(a, np.ones_like(a), self.empty_past(a.shape[0]))[0]

    def prefill_then_step(self, ids: list[list[int]]) -> np.ndarray:
        """Logits of the last token computed through the cache: prefill ``ids[:, :-1]``, then
        one step. fp32 ``[B, V]``."""
        a = np.asarray(ids, dtype=np.int64)
        _, past = self.run(a[:, :-1], np.ones_like(a[:, :-1]), self.empty_past(a.shape[0]))
        return self.run(a[:, -1:], np.ones_like(a), past)[0][:, -1]

    def greedy(self, prompt: list[int], n_new: int, use_cache: bool = True) -> list[int]:
        """Greedy continuation of one prompt: with the KV cache, or recomputing the full
        sequence each step."""
        seq = list(prompt)
        past = self.empty_past(1)
        pending = np.asarray([seq], dtype=np.int64)
        for _ in range(n_new):
            if use_cache:
                mask = np.ones((1, len(seq)), dtype=np.int64)
                lg, past = self.run(pending, mask, past)
            else:
                lg = self.logits([seq])
            tok = int(np.argmax(lg[0, -1]))
            seq.append(tok)
            pending = np.asarray([[tok]], dtype=np.int64)
        return seq[len(prompt):]


def reference_model(model: QModel) -> Any:
    """transformers ``<Arch>ForCausalLM`` (fp32, eager attention) holding the IR's weights."""
    import torch
    import transformers

    arch = model.architecture
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = cfg_cls.from_dict(dict(model.config))
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                      dtype=torch.float32)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd and cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=True)
    return m.eval()


def reference_logits(model: QModel, ids: list[list[int]], ref: Any = None) -> tuple[np.ndarray,
                                                                                   Any]:
    """fp32 logits ``[B, T, V]`` of the reference; returns (logits, the reference model)."""
    import torch

    ref = ref if ref is not None else reference_model(model)
    with torch.no_grad():
        out = ref(torch.tensor(ids, dtype=torch.long), use_cache=False).logits
    return out.float().numpy(), ref
