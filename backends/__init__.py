"""qexport.backends: one folder per target (gguf/, onnx/, vllm/), each with its spec table,
packers, a short numpy reference decoder, lower() and verify()."""
