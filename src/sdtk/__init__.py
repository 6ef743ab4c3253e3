"""sdtk: the Stable Diffusion model toolkit.

Read any model file lazily and safely, write safetensors by streaming.
"""
from sdtk.errors import SdtkError
from sdtk.version import __version__
__all__ = ["SdtkError", "open_model", "__version__"]


def __getattr__(name: str):
    # open_model is imported on first use: `import sdtk` (and the CLI's start-up, which guards
    # against Ctrl-C only once this package is imported) stays cheap
    if name == "open_model":
        from sdtk.formats import open_model

        return open_model
    raise AttributeError(f"module 'sdtk' has no attribute {name!r}")
