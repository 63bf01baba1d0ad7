"""Source models: architecture description, lazy loading (HF folder / GGUF / sample), tokenizer
helpers and a small fp32 torch forward used for calibration and evaluation."""
from qexport.model.arch import (LINEAR_GROUPS, LINEAR_MODULES, SUPPORTED, ArchInfo, layer_prefix,
                                linear_names)
from qexport.model.load import SourceModel, load_model, sample_path
from qexport.model.tokenizer import bos_to_add, load_tokenizer

__all__ = ["ArchInfo", "SUPPORTED", "LINEAR_GROUPS", "LINEAR_MODULES", "layer_prefix",
           "linear_names", "SourceModel", "load_model", "sample_path", "load_tokenizer",
           "bos_to_add", "build_causal_lm", "CausalLM", "DecoderLayer"]


def __getattr__(name: str):  # torch is imported only when the forward is used
    if name in ("build_causal_lm", "CausalLM", "DecoderLayer"):
        from qexport.model import forward
        return getattr(forward, name)
    raise AttributeError(name)
