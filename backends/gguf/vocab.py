"""Tokenizer metadata for a GGUF file (``tokenizer.*`` keys), from the IR's tokenizer files.

Sources, in order of preference:

| IR tokenizer file                  | written as                                                  |
|------------------------------------|-------------------------------------------------------------|
| ``gguf_tokenizer.json``            | the source GGUF's raw ``tokenizer.*`` keys, verbatim (typed) |
| ``tokenizer.model`` (SentencePiece)| ``tokenizer.ggml.model = llama``: tokens, scores, types      |
| ``tokenizer.json`` (byte-level BPE)| ``tokenizer.ggml.model = gpt2``: tokens, types, merges, pre  |

``gguf_tokenizer.json`` format (the one ``qexport.model.gguf_source.gguf_tokenizer_metadata``
writes for a GGUF input; :func:`kv_json` makes the same from a reader's fields and
:func:`add_kv_json` writes it back)::

    {"format": 1,
     "keys": {"tokenizer.ggml.model": {"type": "STRING", "value": "gpt2"},
              "tokenizer.ggml.bos_token_id": {"type": "UINT32", "value": 1},
              "tokenizer.ggml.tokens": {"type": "ARRAY", "item_type": "STRING", "value": [...]}}}

Strings that are not valid UTF-8 are kept with ``surrogateescape`` (JSON ``\\udcXX``) and
written back as the original bytes.
"""
from __future__ import annotations

import json
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from qexport.errors import InputError, UnsupportedError

__all__ = ["KV_FORMAT", "kv_json", "add_kv_json", "add_tokenizer"]

KV_FORMAT = 1
_SCALAR_TYPES = {t.name: t for t in GGUFValueType if t not in (GGUFValueType.ARRAY,)}


def _py(val: Any) -> Any:
    if isinstance(val, (bytes, bytearray)):
        return bytes(val).decode("utf-8", errors="surrogateescape")
    return val.item() if hasattr(val, "item") else val


def kv_json(fields: dict[str, Any], prefix: str = "tokenizer.") -> dict[str, Any]:
    """Typed JSON of the GGUF keys starting with ``prefix`` (``GGUFReader.fields``)."""
    kv: dict[str, Any] = {}
    for key, f in fields.items():
        if not key.startswith(prefix):
            continue
        vt = GGUFValueType(int(f.types[0]))
        if vt == GGUFValueType.ARRAY:
            it = GGUFValueType(int(f.types[1]))
            if it == GGUFValueType.STRING:
                vals = [_py(bytes(f.parts[i])) for i in f.data]
            else:
                vals = [_py(f.parts[i][0]) for i in f.data]
            kv[key] = {"type": "ARRAY", "item_type": it.name, "value": vals}
        elif vt == GGUFValueType.STRING:
            kv[key] = {"type": "STRING", "value": _py(bytes(f.parts[f.data[0]]))}
        else:
            kv[key] = {"type": vt.name, "value": _py(f.parts[f.data[0]][0])}
    return {"format": KV_FORMAT, "keys": kv}


def _enc(v: Any, t: GGUFValueType) -> Any:
    return v.encode("utf-8", errors="surrogateescape") if t == GGUFValueType.STRING else v


def add_kv_json(w: gguf.GGUFWriter, data: bytes) -> None:
    """Write the keys of a ``gguf_tokenizer.json`` (see module doc) verbatim."""
    try:
        doc = json.loads(data)
        if doc.get("format") != KV_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        items = doc["keys"].items()
    except (ValueError, KeyError, AttributeError) as e:
        raise InputError(f"gguf_tokenizer.json: expected {{'format': {KV_FORMAT}, "
                         f"'keys': {{...}}}} ({e})") from e
    for key, ent in items:
        try:
            if ent["type"] == "ARRAY":
                it = _SCALAR_TYPES[ent["item_type"]]
                vals = [_enc(v, it) for v in ent["value"]]
                w.add_key_value(key, vals, GGUFValueType.ARRAY, sub_type=it)
            else:
                t = _SCALAR_TYPES[ent["type"]]
                w.add_key_value(key, _enc(ent["value"], t), t)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"gguf_tokenizer.json: key {key}: bad entry ({e})") from e


def _tok_config(files: dict[str, bytes]) -> dict[str, Any]:
    raw = files.get("tokenizer_config.json")
    return json.loads(raw) if raw else {}


def _spm(w: gguf.GGUFWriter, files: dict[str, bytes], vocab_size: int) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    toks, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        toks.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        types.append(int(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL
                         if sp.is_control(i) else TokenType.BYTE if sp.is_byte(i)
                         else TokenType.UNUSED if sp.is_unused(i) else TokenType.NORMAL))
    added = _added_tokens(files)
    for i in range(len(toks), max(vocab_size, len(toks))):   # converter: pad to vocab_size
        text, special = added.get(i, (f"[PAD{i}]", None))
        toks.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED if special is None else TokenType.CONTROL if special
                         else TokenType.USER_DEFINED))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for setter, idx in ((w.add_bos_token_id, sp.bos_id()), (w.add_eos_token_id, sp.eos_id()),
                        (w.add_unk_token_id, sp.unk_id()), (w.add_pad_token_id, sp.pad_id())):
        if idx >= 0:
            setter(idx)
    _add_flags(w, _tok_config(files), bos_default=True)


def _added_tokens(files: dict[str, bytes]) -> dict[int, tuple[str, bool]]:
    raw = files.get("tokenizer.json")
    if not raw:
        return {}
    return {int(t["id"]): (t["content"], bool(t.get("special")))
            for t in json.loads(raw).get("added_tokens", [])}


def _add_flags(w: gguf.GGUFWriter, tc: dict[str, Any], bos_default: bool) -> None:
    w.add_add_bos_token(bool(tc.get("add_bos_token", bos_default)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])


def _is_plain_bytelevel(pre: dict[str, Any] | None) -> bool:
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _post_adds_bos(post: dict[str, Any] | None) -> bool:
    """Whether a tokenizer.json post-processor puts a special token first (BOS)."""
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_post_adds_bos(p) for p in post.get("processors", []))
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and "SpecialToken" in single[0]


def _bpe(w: gguf.GGUFWriter, files: dict[str, bytes], config: dict[str, Any],
         bpe_pre: str | None) -> None:
    tj = json.loads(files["tokenizer.json"])
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"tokenizer.json: model type {model.get('type')!r}; GGUF "
                               "export handles byte-level BPE or a SentencePiece "
                               "tokenizer.model")
    pre = bpe_pre or ("gpt-2" if _is_plain_bytelevel(tj.get("pre_tokenizer")) else None)
    if pre is None:
        raise UnsupportedError("tokenizer.json: cannot tell llama.cpp's pre-tokenizer for "
                               f"{json.dumps(tj.get('pre_tokenizer'))[:120]}; pass bpe_pre= "
                               "(a tokenizer.ggml.pre name such as 'llama-bpe', 'qwen2', "
                               "'smollm')")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: (int(t["id"]), bool(t.get("special")))
             for t in tj.get("added_tokens", [])}
    for text, (i, _) in added.items():
        vocab.setdefault(text, i)
    n = max(int(config.get("vocab_size") or 0), max(vocab.values()) + 1)
    toks = [f"[PAD{i}]" for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    for text, i in vocab.items():
        toks[i] = text
        types[i] = int(TokenType.NORMAL)
    for text, (i, special) in added.items():
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(toks)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    tc = _tok_config(files)
    for setter, key in ((w.add_bos_token_id, "bos_token"), (w.add_eos_token_id, "eos_token"),
                        (w.add_pad_token_id, "pad_token")):
        idx = config.get(f"{key}_id")
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if not isinstance(idx, int) and isinstance(tok, str) and tok in vocab:
            idx = vocab[tok]
        if isinstance(idx, int):
            setter(idx)
    _add_flags(w, tc, bos_default=_post_adds_bos(tj.get("post_processor")))


def add_tokenizer(w: gguf.GGUFWriter, files: dict[str, bytes], config: dict[str, Any], *,
                  bpe_pre: str | None = None) -> str:
    """Add ``tokenizer.*`` keys from the IR's tokenizer files; returns the source used."""
    if "gguf_tokenizer.json" in files:
        add_kv_json(w, files["gguf_tokenizer.json"])
        return "gguf_tokenizer.json"
    if "tokenizer.model" in files:
        _spm(w, files, int(config.get("vocab_size") or 0))
        return "tokenizer.model"
    if "tokenizer.json" in files:
        _bpe(w, files, config, bpe_pre)
        return "tokenizer.json"
    raise UnsupportedError(f"no tokenizer to write into the GGUF: expected gguf_tokenizer.json,"
                           f" tokenizer.model or tokenizer.json among the IR's tokenizer files "
                           f"(found {sorted(files)})")
