"""Write a loadable model (default: the sample SmolLM2 GGUF) as a plain HF folder.

    .venv/bin/python samples/sample_to_hf.py OUT_DIR [--model sample:smollm2] [--force]

Output: ``config.json``, ``model.safetensors`` (float32, HF names and row order; the Q4_1/Q8_0
weights dequantized exactly as transformers' GGUF loader does) and the tokenizer files
(``gguf_tokenizer.json`` included). transformers loads it with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)``; qexport with ``load_model(OUT_DIR)``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def export_hf(model: str, out: str | Path, force: bool = False) -> Path:
    """Write ``model`` (anything :func:`qexport.model.load_model` opens) as an HF folder."""
    from safetensors.numpy import save_file

    from qexport.atomic import atomic_output
    from qexport.model import load_model

    src = load_model(model)
    with atomic_output(out, is_dir=True, force=force) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = dict(src.config, torch_dtype="float32")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file(src.state_dict(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in src.tokenizer.items():
            (tmp / name).write_bytes(data)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="sample:smollm2")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    print(export_hf(args.model, args.out, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
