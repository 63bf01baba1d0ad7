"""Tiny random Llama / Mistral / Qwen2 models with a real SentencePiece tokenizer, offline.

The tokenizer is a 1000-piece BPE (byte fallback) trained in about a second on this Python's
own standard-library sources, so the same ids come out of transformers, llama.cpp and
onnxruntime-genai. Models are random (std 0.05 so logits are not all ~0) and deterministic for
a given seed.
"""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np

__all__ = ["make_tokenizer_dir", "make_tiny_model", "ARCH_CLASSES"]

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}


def _corpus_lines(limit: int = 60000) -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:80]
    text = "\n".join(open(f, encoding="utf-8", errors="ignore").read() for f in files)
    return [ln for ln in text.splitlines() if ln.strip()][:limit]


def make_tokenizer_dir(out: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Write ``tokenizer.model`` + HF tokenizer files (LlamaTokenizer) into ``out``."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        split_digits=True, num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out), legacy=False, add_bos_token=True,
                                         add_eos_token=False)
    tok.save_pretrained(str(out))
    return out


def make_tiny_model(out: str | os.PathLike, arch: str = "llama", *, hidden: int = 256,
                    intermediate: int = 512, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, vocab: int = 1000, tie: bool = False,
                    dtype: str = "float32", std: float = 0.05, seed: int = 0,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a random HF model folder (config.json, model.safetensors, tokenizer files).

    Args:
        arch: "llama", "mistral" or "qwen2" (qwen2 has q/k/v biases).
        tokenizer_dir: a folder from :func:`make_tokenizer_dir` to copy (trained if None).
    """
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        make_tokenizer_dir(out, vocab)
    else:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
    cls_name = ARCH_CLASSES[arch]
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=tie)
    cfg.architectures = [cls_name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 2:
                p.copy_(torch.from_numpy(gen.normal(0, std, p.shape).astype(np.float32)))
            elif p.dim() == 1 and "norm" in _:
                p.copy_(torch.from_numpy(1 + gen.normal(0, 0.1, p.shape).astype(np.float32)))
            else:
                p.copy_(torch.from_numpy(gen.normal(0, std, p.shape).astype(np.float32)))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "config.json"
    c = json.loads(cfg_path.read_text())
    c["torch_dtype"] = dtype
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True))
    return out
