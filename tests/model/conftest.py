"""Fixtures for qexport.model tests: GGUF files written from the tiny HF fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from gguf_fixture import write_gguf


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tiny_llama: Path) -> Path:
    """tiny_llama as a GGUF: Q8_0 linears/embeddings (Q/K permuted), F32 norms, SPM vocab."""
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", "Q8_0")


@pytest.fixture(scope="session")
def tiny_llama_gguf_f32(tmp_path_factory, tiny_llama: Path) -> Path:
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "F32")
