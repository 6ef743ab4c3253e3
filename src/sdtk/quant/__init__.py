"""Block quantization (ggml's GGUF types): the type table, numpy dequantizers, and quantizers
(the optional C extension `sdtk._quant`, with a numpy fallback giving the same bytes)."""
