"""identify: catalogue -> Identity (architecture, variant, components, precision, EMA,
prediction type, problems, advice). Pure functions over names, shapes and dtypes.

    from sdtk.identify import identify, identify_path
    ident = identify_path("model.safetensors")
    ident.architecture, ident.components["unet"].prefix, ident.to_json()
"""
from sdtk.identify.core import identify, identify_path, precision_of
from sdtk.identify.model import SCHEMA, Advice, Component, Identity, Problem

__all__ = ["SCHEMA", "Advice", "Component", "Identity", "Problem", "identify", "identify_path", "precision_of"]
