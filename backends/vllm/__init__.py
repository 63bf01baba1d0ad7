"""vLLM backend: Hugging Face folders in compressed-tensors ``pack-quantized`` or GPTQ v1
packing (vLLM, transformers, GPTQModel), LoRC as a PEFT LoRA adapter, and their verifier."""
from .lower import lower_vllm
from .specs import vllm_spec

__all__ = ["lower_vllm", "vllm_spec", "verify_vllm"]


def __getattr__(name: str):
    if name == "verify_vllm":
        from .verify import verify_vllm
        return verify_vllm
    raise AttributeError(name)
