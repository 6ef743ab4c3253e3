"""Build the optional C extensions (vectorised fp16/bf16 casts; two-stream SHA-256; ggml block quantization). Everything else is in
pyproject.toml. Without a C compiler the build goes on without it and sdtk uses numpy's casts."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sdtk._fastcast",
            sources=["src/sdtk/_fastcast.c"],
            # no FP traps are used, and without them gcc if-converts and vectorises the fp8 loops
            extra_compile_args=["-O3", "-fno-trapping-math"],
            optional=True,
        ),
        # SHA-256 on the SHA extensions, two messages interleaved (SHA256 + AutoV3 in one pass)
        Extension(
            "sdtk._sha2",
            sources=["src/sdtk/_sha2.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        # ggml block quantization (GGUF). -ffp-contract=off: no fused multiply-add, so the bytes
        # equal ggml's reference quantizer built without contraction on every platform.
        Extension(
            "sdtk._quant",
            sources=["src/sdtk/_quant.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        ),
    ]
)
