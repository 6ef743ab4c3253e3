"""Helpers for the merge/diff tests: scaled-down random-valued models built from real layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from sdtk.formats import open_model
from sdtk.formats.safetensors import write_safetensors
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import from_array

FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def make_model(folder: Path, name: str, layout: str = "sd15-emaonly", seed: int = 1, scale: int = 8,
               dtype: Optional[str] = None, transform=None, metadata=None, channels: Optional[int] = None) -> Path:
    """A scaled-down model with small random values (`layout_plan(..., values="random")`).
    `channels`: give the UNet's first conv this many input channels (scaling would turn the
    inpainting model's 9 into 1)."""
    lay = load_layout(layout)
    if dtype:
        lay = lay.with_dtype(dtype)
    if transform:
        lay = transform(lay)
    path = Path(folder) / f"{name}.safetensors"
    plan = layout_plan(lay, values="random", seed=seed, scale=scale)
    if channels:
        for i, t in enumerate(plan):
            if t.name == FIRST_CONV:
                shape = (t.shape[0], channels) + tuple(t.shape[2:])
                arr = (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.05).astype(t.dtype.numpy)
                plan[i] = from_array(t.name, arr)
    write_safetensors(path, plan, metadata or {}, overwrite=True)
    return path


def tensors(path) -> dict:
    """All tensors of a file as numpy arrays (copies)."""
    with open_model(path) as cat:
        return {k: np.array(t.read()) for k, t in cat.tensors.items()}


def metadata(path) -> dict:
    with open_model(path) as cat:
        return dict(cat.metadata)


def dtypes(path) -> dict:
    with open_model(path) as cat:
        return {k: t.dtype.short for k, t in cat.tensors.items()}
