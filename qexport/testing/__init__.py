"""Fixtures for tests and benchmarks, generated here (never third-party weights)."""
from .fixtures import make_tiny_model, make_tokenizer_dir

__all__ = ["make_tiny_model", "make_tokenizer_dir"]
