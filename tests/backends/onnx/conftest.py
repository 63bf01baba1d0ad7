"""Fixtures of the ONNX backend tests: a tiny model whose rows are ragged for block 128."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # onnx_irutil (test helper module beside this file)


@pytest.fixture(scope="session")
def tiny_ragged(tmp_path_factory, tokenizer_dir) -> Path:
    """Random Llama with hidden 192 / intermediate 320 (block 128 leaves 64-column tails)."""
    from qexport.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-ragged"), "llama", hidden=192,
                           intermediate=320, heads=3, kv_heads=1, tokenizer_dir=tokenizer_dir)
