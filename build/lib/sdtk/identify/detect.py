"""Match a file's names and shapes against the architecture tables (first match wins)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from sdtk.architectures import ADJACENT, FAMILIES, VARIANTS, Adjacent, Family, Variant
from sdtk.architectures.match import all_hold

Shape = Tuple[int, ...]

# Where a diffusion model's keys may start. Sources: ldm/sgm single files (model.diffusion_model.),
# ComfyUI model_detection.py unet_prefix_from_state_dict (model.model., net.), bare files
# (BFL flux1-dev.safetensors, diffusers diffusion_pytorch_model.safetensors).
PREFIXED_DIFFUSION = ("model.diffusion_model.", "model.model.", "net.", "diffusion_model.")
BARE = ""
ADAPTER_KINDS = ("lora", "embedding", "hypernetwork", "controlnet", "t2i-adapter")


@dataclass(frozen=True)
class DiffusionMatch:
    family: Family
    variant: Variant
    prefix: str
    in_channels: Optional[int]


@dataclass(frozen=True)
class AdjacentMatch:
    row: Adjacent
    prefix: str


def strip(shapes: Mapping[str, Shape], prefix: str) -> Dict[str, Shape]:
    if not prefix:
        return dict(shapes)
    n = len(prefix)
    return {k[n:]: s for k, s in shapes.items() if k.startswith(prefix)}


def match_diffusion(shapes: Mapping[str, Shape], prefixes: Sequence[str]) -> Optional[DiffusionMatch]:
    for prefix in prefixes:
        view = strip(shapes, prefix) if prefix else shapes
        if not view:
            continue
        for fam in FAMILIES:
            if not all_hold(fam.conditions, view):
                continue
            in_ch = None
            if fam.in_channels_key and fam.in_channels_key[0] in view:
                key, axis = fam.in_channels_key
                shp = view[key]
                in_ch = shp[axis] if len(shp) > axis else None
            features = {"in_channels": in_ch}
            for var in VARIANTS:
                if var.family == fam.name and all_hold(var.conditions, view, features):
                    return DiffusionMatch(fam, var, prefix, in_ch)
    return None


def match_adjacent(shapes: Mapping[str, Shape], kinds: Sequence[str]) -> Optional[AdjacentMatch]:
    for row in ADJACENT:
        if row.kind not in kinds:
            continue
        for prefix in row.prefixes:
            view = strip(shapes, prefix) if prefix else shapes
            if view and all_hold(row.conditions, view):
                return AdjacentMatch(row, prefix)
    return None


def component_model(stripped: Mapping[str, Shape], kind: str) -> Optional[str]:
    """What a text encoder or VAE component is (clip-l, clip-g, t5-xxl, sd-vae-kl-f8, ...)."""
    m = match_adjacent(stripped, (kind,))
    return m.row.architecture if m else None
