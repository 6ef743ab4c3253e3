"""What models ARE: declarative tables (signatures, variants, component prefixes, adjacent file
types, known key sets). Data and pure lookups; nothing here opens a model file.

Public API (used by identify, convert, merge):
- component_prefixes(architecture_or_family) -> {component: [prefixes]}
- ema_key_for(unet_key) -> LitEma key; ema_map(unet_keys) -> {ema key: unet key}
- ARCHITECTURES (id -> Architecture), family_of(id), architecture(id)
- FAMILIES, VARIANTS (diffusion models), ADJACENT (LoRA, embeddings, VAE, text encoders, ...)
- DDPM_BUFFERS, MARKER_KEYS, known_keys(architecture, component)
"""
from sdtk.architectures.adjacent import ADJACENT, CONTEXT_WIDTH_BASE, EMBEDDING_WIDTH_BASE, KOHYA_BASE, Adjacent
from sdtk.architectures.layouts import is_optional, known_keys, split_key
from sdtk.architectures.prefixes import (COMPONENT_ORDER, DDPM_BUFFERS, FAMILY_PREFIXES, MARKER_KEYS,
                                         component_prefixes, ema_key_for, ema_map)
from sdtk.architectures.registry import ARCHITECTURES, Architecture, architecture, family_of, title_of
from sdtk.architectures.signatures import FAMILIES, VARIANTS, Family, Variant

__all__ = [
    "ADJACENT", "ARCHITECTURES", "Adjacent", "Architecture", "COMPONENT_ORDER", "CONTEXT_WIDTH_BASE", "DDPM_BUFFERS",
    "EMBEDDING_WIDTH_BASE", "FAMILIES", "FAMILY_PREFIXES", "Family", "KOHYA_BASE", "MARKER_KEYS", "VARIANTS", "Variant",
    "architecture", "component_prefixes", "ema_key_for", "ema_map", "family_of", "is_optional", "known_keys", "split_key",
    "title_of",
]
