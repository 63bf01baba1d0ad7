"""``genai_config.json`` for onnxruntime-genai, matching graph.py's I/O names, plus tokenizer files.

The graph concatenates the past and the new keys/values (present has length P + T), so
``past_present_share_buffer`` is false; there is no ``position_ids`` input (positions come from
the attention mask inside the graph).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qexport.errors import LoweringError
from qexport.ir import QModel

from .arch import DecoderConfig

__all__ = ["genai_config", "write_genai_files", "MODEL_FILE", "DATA_FILE"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def genai_config(model: QModel, dc: DecoderConfig, *, cuda: bool) -> dict[str, Any]:
    """The config dict (``model`` / ``search`` sections, names as in graph.py)."""
    cfg = model.config
    eos = _ids(cfg.get("eos_token_id"))
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    providers: list[dict[str, Any]] = [{"cuda": {}}] if cuda else []
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
        "filename": MODEL_FILE, "head_size": dc.head_dim, "hidden_size": dc.hidden,
        "num_attention_heads": dc.heads, "num_hidden_layers": dc.layers,
        "num_key_value_heads": dc.kv_heads,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    return {
        "model": {"bos_token_id": int(cfg.get("bos_token_id") or 0),
                  "context_length": dc.max_pos, "decoder": decoder, "eos_token_id": eos,
                  "pad_token_id": int(pad), "type": dc.model_type, "vocab_size": dc.vocab},
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "max_length": dc.max_pos, "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_files(out: Path, model: QModel, dc: DecoderConfig, *, cuda: bool) -> list[str]:
    """Write genai_config.json and the IR's tokenizer files into ``out``; returns file names.

    Raises LoweringError when the IR carries no tokenizer onnxruntime-genai can load
    (``tokenizer.json``, or ``tokenizer.model`` with ``tokenizer_config.json``).
    """
    tok = model.tokenizer
    has_json = "tokenizer.json" in tok
    has_spm = "tokenizer.model" in tok and "tokenizer_config.json" in tok
    if not (has_json or has_spm):
        raise LoweringError(f"tokenizer: expected tokenizer.json or tokenizer.model + "
                            f"tokenizer_config.json in the IR (found {sorted(tok)})")
    written = []
    for name, data in sorted(tok.items()):
        if "/" in name or name.startswith("."):
            raise LoweringError(f"tokenizer file {name!r}: expected a plain file name")
        (out / name).write_bytes(data)
        written.append(name)
    (out / "genai_config.json").write_text(json.dumps(genai_config(model, dc, cuda=cuda),
                                                      indent=4) + "\n")
    return ["genai_config.json"] + written
