"""Write a small llama.cpp-style GGUF from a tiny HF folder (test fixture, uses gguf-py's writer).

Follows llama.cpp's converter: llama.cpp tensor names, Q/K rows permuted for the Llama family,
norms F32, 2-D weights F32 or Q8_0 (quantized by gguf-py), SentencePiece vocabulary metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qexport.model.gguf_source import GGUF_ARCHES, GLOBAL_NAMES, LAYER_NAMES, permute_qk

HF_TO_GGUF = {v: k for k, v in {**GLOBAL_NAMES, **LAYER_NAMES}.items()}


def hf_to_gguf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("model.layers."):
        idx, _, rel = base[len("model.layers."):].partition(".")
        return f"blk.{idx}.{HF_TO_GGUF[rel]}.{suffix}"
    return f"{HF_TO_GGUF[base]}.{suffix}"


def _add_sentencepiece_vocab(w, tok_model: Path) -> None:
    import gguf
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types.append(int(t))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_gguf(hf_dir: Path, out: Path, quantized: str = "Q8_0", arch: str = "llama",
               truncate_to: int | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    """GGUF of ``hf_dir``: 2-D linears in ``quantized`` ("Q8_0" or "F32"), everything else F32;
    ``extra`` tensors (GGUF names) are added as they are."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 512))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    if (hf_dir / "tokenizer.model").is_file():
        _add_sentencepiece_vocab(w, hf_dir / "tokenizer.model")
    permuted = GGUF_ARCHES.get(arch, ("", "", False))[2]
    for gname, arr in (extra or {}).items():
        w.add_tensor(gname, arr)
    for name in sorted(sd):
        arr = sd[name].astype(np.float32)
        if permuted and ".q_proj." in name:
            arr = permute_qk(arr, heads)
        elif permuted and ".k_proj." in name:
            arr = permute_qk(arr, kv)
        gname = hf_to_gguf_name(name)
        if arr.ndim == 2 and quantized == "Q8_0" and arr.shape[1] % 32 == 0:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_to is not None:
        data = out.read_bytes()
        out.write_bytes(data[:truncate_to])
    return out
