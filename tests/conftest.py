"""Shared pytest fixtures: tiny generated models (cached per session), seeded RNG, data paths."""
from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def _torch_threads() -> None:
    try:
        import torch
        torch.set_num_threads(2)
    except ImportError:
        pass


_torch_threads()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set QEXPORT_SHARED)")
    return DATA


@pytest.fixture(scope="session")
def stories260k(data_dir: Path) -> Path:
    p = data_dir / "models" / "stories260K" / "hf"
    if not p.is_dir():
        pytest.skip(f"{p} absent")
    return p


@pytest.fixture(scope="session")
def c4_text(data_dir: Path) -> Path:
    p = data_dir / "exllamav2-cal" / "c4.utf8"
    if not p.is_file():
        pytest.skip(f"{p} absent")
    return p


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qexport.testing import make_tokenizer_dir
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def _tiny(tmp_path_factory, tokenizer_dir, arch, **kw) -> Path:
    from qexport.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch,
                           tokenizer_dir=tokenizer_dir, **kw)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """Random Llama: hidden 256, intermediate 512, 2 layers, 4 heads / 2 KV heads, vocab 1000."""
    return _tiny(tmp_path_factory, tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    """Random Qwen2 (q/k/v biases), same sizes as tiny_llama, tied embeddings."""
    return _tiny(tmp_path_factory, tokenizer_dir, "qwen2", tie=True)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tokenizer_dir) -> Path:
    return _tiny(tmp_path_factory, tokenizer_dir, "mistral")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~60 KB of Python stdlib source (the tiny tokenizer's own training domain)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[80:100]
    text = "\n".join(open(f, encoding="utf-8", errors="ignore").read() for f in files)
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(text[:60000], encoding="utf-8")
    return p


@pytest.fixture
def one_torch_thread():
    """One torch thread for tests of tiny blocks (thread overhead dominates on 2 busy cores)."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
