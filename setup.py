"""Build the one optional C extension (vectorised fp16/bf16 casts). Everything else is in
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
        )
    ]
)
