"""Split a catalogue's keys into components using the family's prefix table."""
from __future__ import annotations

from typing import Dict, Mapping

from sdtk.architectures import COMPONENT_ORDER
from sdtk.architectures.layouts import prefix_order, split_key_ordered
from sdtk.identify.model import Component
from sdtk.tensors import LazyTensor


def split_components(tensors: Mapping[str, LazyTensor], table: Dict[str, list], bare_component: str = "other") -> Dict[str, Component]:
    """{component: Component}; keys matching no prefix go to `bare_component` ("unet" for bare
    diffusion-model files, "other" otherwise)."""
    comps: Dict[str, Component] = {}
    prefix_counts: Dict[str, Dict[str, int]] = {}
    ordered = prefix_order(table)
    for key, t in tensors.items():
        name, prefix = split_key_ordered(key, ordered)
        if name == "other":
            name = bare_component
        comp = comps.get(name)
        if comp is None:
            comp = comps[name] = Component(name=name, prefix=prefix)
        counts = prefix_counts.setdefault(name, {})
        counts[prefix] = counts.get(prefix, 0) + 1
        comp.keys.append(key)
        n = t.numel
        comp.parameters += n
        comp.bytes += n * t.dtype.itemsize
        comp.dtypes[t.dtype.short] = comp.dtypes.get(t.dtype.short, 0) + 1
    for name, counts in prefix_counts.items():  # the prefix most of its keys carry
        comps[name].prefix = max(counts.items(), key=lambda kv: (kv[1], len(kv[0])))[0]
    order = {n: i for i, n in enumerate(COMPONENT_ORDER)}
    return dict(sorted(comps.items(), key=lambda kv: order.get(kv[0], len(order))))

