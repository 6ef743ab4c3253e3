"""Scaled-down copies of known layouts (every dimension above 8 divided by the same factor, key
names kept: the toy/test files `sdtk.samples.layout_plan(scale=N)` and the fixtures make).
Shapes cannot identify them, so when nothing else matches, a file whose key set equals a
packaged layout's and whose shapes are that layout's divided by one factor is named after the
layout, with a warning that it is a scaled-down copy no UI can load."""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Mapping, Optional, Tuple

from sdtk.architectures.layouts import is_optional

Shape = Tuple[int, ...]

# Packaged layout -> the architecture (and kind) it is. Source: sdtk/data/layouts/SOURCE.md and
# the cross-check with diffusers infer_diffusers_model_type recorded there.
LAYOUT_ARCHITECTURE = {
    "sd15-full-ema": "stable-diffusion-v1", "sd15-emaonly": "stable-diffusion-v1",
    "sd15-inpainting": "stable-diffusion-v1-inpainting", "sd21-768-v": "stable-diffusion-v2",
    "sdxl-base": "stable-diffusion-xl-v1-base", "sdxl-vpred-ztsnr": "stable-diffusion-xl-v1-base",
    "flux1-dev": "flux-1-dev", "flux1-schnell": "flux-1-schnell", "flux1-dev-aio": "flux-1-dev",
    "sd3-medium-incl-clips": "stable-diffusion-v3-medium", "vae-sd-kl-f8": "sd-vae-kl-f8", "clip-l-hf": "clip-l",
}


@lru_cache(maxsize=None)
def _layout_shapes(name: str) -> Dict[str, Shape]:
    from sdtk.real_layouts import load_layout

    return {k: tuple(s) for k, s, _ in load_layout(name).tensors}


def _scale_range(real: Shape, seen: Shape, lo: int, hi: int) -> Optional[Tuple[int, int]]:
    """Narrow [lo, hi], the factors s with seen == max(1, real // s) for dims > 8 (others equal)."""
    if len(real) != len(seen):
        return None
    for r, f in zip(real, seen):
        if r <= 8:
            if f != r:
                return None
            continue
        if f == 1:  # r // s <= 1  ->  s > r / 2
            lo = max(lo, r // 2 + 1)
        else:
            lo = max(lo, r // (f + 1) + 1)
            hi = min(hi, r // f)
        if lo > hi:
            return None
    return lo, hi


@lru_cache(maxsize=None)
def _largest_key(name: str) -> str:
    import math

    return max(_layout_shapes(name).items(), key=lambda kv: math.prod(kv[1]))[0]


@lru_cache(maxsize=None)
def _required_keys(name: str) -> frozenset:
    return frozenset(k for k in _layout_shapes(name) if not is_optional(k))


def match_scaled_layout(shapes: Mapping[str, Shape], architecture: Optional[str] = None) -> Optional[Tuple[str, str, int]]:
    """(layout name, architecture, scale factor) or None. With `architecture` (what the shapes
    already said), only that architecture's layouts are tried (no other layout is loaded)."""
    from sdtk.architectures import family_of

    wanted = family_of(architecture) if architecture else None
    keys = None
    for name, arch in LAYOUT_ARCHITECTURE.items():
        if architecture is not None and arch != architecture and (wanted == "unknown" or family_of(arch) != wanted):
            continue
        real = _layout_shapes(name)
        if abs(len(shapes) - len(real)) > 8:  # optional keys are few: the key sets cannot be equal
            continue
        probe = _largest_key(name)
        if probe not in shapes or tuple(shapes[probe]) == real[probe]:
            continue  # full size (the largest tensor has its real shape), or another key set
        if keys is None:
            keys = {k for k in shapes if not is_optional(k)}
        if len(keys) != len(_required_keys(name)) or keys != _required_keys(name):
            continue
        lo, hi = 2, 1 << 20
        for k in keys:
            rng = _scale_range(real[k], tuple(shapes[k]), lo, hi)
            if rng is None:
                break
            lo, hi = rng
        else:
            return name, arch, lo
    return None
