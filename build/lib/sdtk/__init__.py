"""sdtk: the Stable Diffusion model toolkit.

Read any model file lazily and safely, write safetensors by streaming.
"""
from sdtk.errors import SdtkError
from sdtk.formats import open_model

__version__ = "0.1.0"
__all__ = ["SdtkError", "open_model", "__version__"]
