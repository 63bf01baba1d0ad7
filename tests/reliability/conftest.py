"""Reliability-test fixtures: calibration text in the tiny tokenizer's domain."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Random Llama small enough for GPTQ in a second: hidden 64, ffn 128, 2 layers."""
    from qexport.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("micro"), "llama", hidden=64,
                           intermediate=128, layers=2, heads=2, kv_heads=1,
                           tokenizer_dir=tokenizer_dir)
