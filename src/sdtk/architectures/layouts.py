"""Known key sets of real files, per architecture and component, for "missing keys" and
"unknown extra keys" reports. They come from the packaged layouts (sdtk.samples; source:
sdtk/data/layouts/SOURCE.md), split with the family's prefix table, prefixes removed."""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, FrozenSet, Optional, Tuple

from sdtk.architectures.prefixes import DDPM_BUFFERS, MARKER_KEYS, component_prefixes
from sdtk.architectures.registry import ARCHITECTURES

# Keys a healthy file may lack (not reported as missing). Sources: architectures reference
# "Text encoder and VAE tells" (position_ids often absent; SDXL files omit CLIP-L layer 11 since
# SDXL uses the penultimate layer); transformers CLIPTextModel (position_ids is a non-persistent
# buffer in transformers >= 4.31); ComfyUI saves logit_scale/text_projection only sometimes;
# ldm LitEma (decay/num_updates); SD3 pos_embed is a buffer some savers drop.
OPTIONAL_SUFFIXES = ("position_ids", "logit_scale", "text_projection", "text_projection.weight", "pos_embed")
OPTIONAL_PREFIXES = ("text_model.encoder.layers.11.", "model_ema.decay", "model_ema.num_updates")


# Keys of the stand-alone layouts, by the architecture id the adjacent table gives them.
STANDALONE_LAYOUTS = {"sd-vae-kl-f8": ("vae-sd-kl-f8", ""), "clip-l": ("clip-l-hf", "")}


def is_optional(stripped_key: str) -> bool:
    return stripped_key.endswith(OPTIONAL_SUFFIXES) or stripped_key.startswith(OPTIONAL_PREFIXES)


def split_key(key: str, prefixes: Dict[str, list]) -> Tuple[str, str]:
    """(component, prefix) of a key under a prefix table; ("other", "") when nothing matches."""
    return split_key_ordered(key, prefix_order(prefixes))


def prefix_order(prefixes: Dict[str, list]) -> Tuple[Tuple[str, str], ...]:
    """A prefix table as (prefix, component) pairs, longest first: compute once, split many keys."""
    return _ordered(tuple((c, tuple(pl)) for c, pl in prefixes.items()))


def split_key_ordered(key: str, ordered: Tuple[Tuple[str, str], ...]) -> Tuple[str, str]:
    if key in _EXACT:
        return _EXACT[key], ""
    for p, component in ordered:
        if key.startswith(p):
            return component, p
    return "other", ""


_EXACT = {**{k: "ddpm_buffers" for k in DDPM_BUFFERS}, **{k: "markers" for k in MARKER_KEYS}}


@lru_cache(maxsize=256)
def _ordered(table) -> Tuple[Tuple[str, str], ...]:
    """(prefix, component), longest prefix first (so the most specific prefix wins)."""
    pairs = [(p, c) for c, plist in table for p in plist if p]
    return tuple(sorted(pairs, key=lambda pc: -len(pc[0])))


@lru_cache(maxsize=None)
def _layout_components(layout_name: str, family_arch: str) -> Dict[str, FrozenSet[str]]:
    from sdtk.real_layouts import load_layout  # data only; no file is opened but the packaged layout

    ordered = prefix_order(component_prefixes(family_arch))
    found: Dict[str, set] = {}
    for key, _, _ in load_layout(layout_name).tensors:
        comp, prefix = split_key_ordered(key, ordered)
        found.setdefault(comp, set()).add(key[len(prefix):])
    return {c: frozenset(k) for c, k in found.items()}


def known_keys(architecture: str, component: str) -> Optional[FrozenSet[str]]:
    """The known key set (component prefix removed) of `component` for `architecture`, or None
    when no packaged layout covers it."""
    if architecture in STANDALONE_LAYOUTS:
        layout, _ = STANDALONE_LAYOUTS[architecture]
        keys = frozenset(k for k, _, _ in _load(layout))
        return keys if component in ("vae", "text_encoder") else None
    arch = ARCHITECTURES.get(architecture)
    if arch is None:
        return None
    for layout in arch.layouts:
        comps = _layout_components(layout, architecture)
        if component in comps:
            return comps[component]
    return None


@lru_cache(maxsize=None)
def _load(layout):
    from sdtk.real_layouts import load_layout

    return load_layout(layout).tensors
