"""Read a llama.cpp ``.gguf`` model as Hugging Face tensors: names, orientation and Q/K row order.

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` (Llama family only) from HF's
rotate-half RoPE order into interleaved pairs; :func:`unpermute_qk` undoes it, so the weights
equal what transformers' own GGUF loader produces. GGUF ``ne`` is the numpy shape reversed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import InputError, UnsupportedError

__all__ = ["GGUF_ARCHES", "GLOBAL_NAMES", "LAYER_NAMES", "GGUFTensors", "gguf_to_hf_name",
           "unpermute_qk", "permute_qk", "gguf_config", "gguf_tokenizer_metadata",
           "GGUF_TOKENIZER_FILE"]

GGUF_TOKENIZER_FILE = "gguf_tokenizer.json"
GGUF_TOKENIZER_FORMAT = 1

# general.architecture -> (HF class, model_type, Q/K rows permuted by the converter)
GGUF_ARCHES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}
GLOBAL_NAMES: dict[str, str] = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                                "output": "lm_head"}
LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; UnsupportedError
    for a tensor with no HF counterpart here (e.g. ``rope_freqs``)."""
    base, dot, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias") or not dot:
        raise UnsupportedError(f"GGUF tensor {name}: not a weight or bias of a supported model")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{suffix}"
    raise UnsupportedError(f"GGUF tensor {name}: no Hugging Face counterpart in a supported "
                           f"architecture (known: {', '.join([*GLOBAL_NAMES, *LAYER_NAMES])})")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs (rows ``[n_head*hd, ...]``)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: llama.cpp row order -> HF rotate-half order."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any, path: str, has_output: bool, vocab: int) -> dict[str, Any]:
    """An HF-style ``config.json`` dict from a GGUF's metadata (``vocab``: token_embd rows)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHES:
        raise UnsupportedError(f"{path}: GGUF architecture '{arch}' is not supported "
                               f"(supported: {', '.join(GGUF_ARCHES)})")
    cls, model_type, _ = GGUF_ARCHES[arch]

    def need(key: str) -> Any:
        val = _field(reader, f"{arch}.{key}")
        if val is None:
            raise InputError(f"{path}: GGUF metadata key '{arch}.{key}' is missing")
        return val

    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedError(f"{path}: GGUF rope scaling '{scaling}' is not supported "
                               "(only none; load the HF folder for llama3 rope scaling)")
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rot = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if int(rot) != head_dim:
        raise UnsupportedError(f"{path}: partial rotary embedding ({rot} of {head_dim} dims) "
                               "is not supported")
    cfg: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type, "hidden_act": "silu",
        "num_hidden_layers": int(need("block_count")), "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": not has_output, "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = False
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        val = _field(reader, f"tokenizer.ggml.{key}")
        if val is not None:
            cfg[hf_key] = int(val)
    return cfg


def gguf_tokenizer_metadata(reader: Any) -> dict[str, Any]:
    """Every ``tokenizer.*`` key with its GGUF value type, JSON-serialisable, so a GGUF writer can
    reproduce it exactly: ``{"format": 1, "keys": {key: {"type", ["item_type"], "value"}}}``."""
    keys: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        entry: dict[str, Any] = {"type": f.types[0].name, "value": f.contents()}
        if len(f.types) > 1:
            entry["item_type"] = f.types[-1].name
        keys[key] = entry
    return {"format": GGUF_TOKENIZER_FORMAT, "keys": keys}


def _open_reader(path: str) -> Any:
    from qexport.backends.gguf.reader import open_gguf
    try:
        return open_gguf(path)      # every size, offset and name checked against the file
    except InputError:
        raise
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on bad files
        raise InputError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from e


class GGUFTensors:
    """Lazy float32 access to a GGUF's tensors under HF names (see module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.reader = _open_reader(self.path)
        self._by_hf: dict[str, Any] = {}
        for t in self.reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf in self._by_hf:
                raise InputError(f"{self.path}: duplicate tensor {t.name}")
            self._by_hf[hf] = t
        emb = self._by_hf.get("model.embed_tokens.weight")
        if emb is None:
            raise InputError(f"{self.path}: no token_embd.weight tensor")
        try:
            arch = _field(self.reader, "general.architecture")
            self.config = gguf_config(self.reader, self.path, "lm_head.weight" in self._by_hf,
                                      int(emb.shape[-1]))
        except (ValueError, TypeError, ZeroDivisionError, UnicodeDecodeError, IndexError) as e:
            raise InputError(f"{self.path}: GGUF metadata unusable ({type(e).__name__}: "
                             f"{e})") from e
        self._permuted = GGUF_ARCHES[arch][2]

    def names(self) -> list[str]:
        return list(self._by_hf)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._by_hf[name].shape))

    def read(self, name: str) -> np.ndarray:
        """Dequantized float32 array of HF tensor ``name`` in HF orientation and row order."""
        import gguf
        t = self._by_hf[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = np.asarray(arr, dtype=np.float32).reshape(self.shape(name))
        except Exception as e:
            raise InputError(f"{self.path}: tensor {t.name} ({t.tensor_type.name}) could not be "
                             f"decoded ({type(e).__name__}: {e})") from e
        if self._permuted and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            key = "num_attention_heads" if ".q_proj." in name else "num_key_value_heads"
            arr = unpermute_qk(arr, int(self.config[key]))
        arr = np.ascontiguousarray(arr)
        return arr if arr.flags.writeable else arr.copy()     # F32 data is a read-only memmap

    def tokenizer_files(self) -> dict[str, bytes]:
        """HF tokenizer files (transformers' GGUF tokenizer conversion, saved) plus
        ``gguf_tokenizer.json`` (raw ``tokenizer.*`` metadata); empty if the file has none."""
        import tempfile

        if _field(self.reader, "tokenizer.ggml.model") is None:
            return {}
        from transformers import AutoTokenizer
        p = Path(self.path)
        try:
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception as e:
            raise InputError(f"{self.path}: transformers could not build a tokenizer from the "
                             f"GGUF vocabulary ({type(e).__name__}: {e})") from e
        files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="qexport-tok-") as tmp:
            tok.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                if f.is_file():
                    files[f.name] = f.read_bytes()
        try:
            meta = gguf_tokenizer_metadata(self.reader)
        except UnicodeDecodeError as e:
            raise InputError(f"{self.path}: tokenizer metadata is not valid UTF-8 ({e})") from e
        files[GGUF_TOKENIZER_FILE] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        return files
