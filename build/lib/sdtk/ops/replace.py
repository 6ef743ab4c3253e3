"""Replace one component of a model by the same component from another file
(`--replace unet=other.safetensors`), names and shapes checked against the model's own.
The other file may hold the component under the model's prefix or bare (as extracted)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Sequence

from sdtk.errors import SdtkError, UsageError
from sdtk.ops.components import component_of, component_prefixes_in
from sdtk.ops.extract import EXTRACTABLE
from sdtk.tensors import LazyTensor


@dataclass
class ReplaceResult:
    plan: List[LazyTensor]
    component: str
    replaced: int


def parse_replace(spec: str):
    if "=" not in spec:
        raise UsageError(None, f"--replace {spec}: expected COMPONENT=FILE (e.g. vae=my-vae.safetensors)")
    component, path = spec.split("=", 1)
    component = component.strip().lower()
    if component not in EXTRACTABLE:
        raise UsageError(None, f"--replace {component}: unknown component; choose from {', '.join(EXTRACTABLE)}")
    if not path:
        raise UsageError(None, f"--replace {spec}: no file given")
    return component, path


def replace_component(plan: Sequence[LazyTensor], component: str, donor: Mapping[str, LazyTensor],
                      donor_path: str, model_path: str = None) -> ReplaceResult:
    present = component_prefixes_in(t.name for t in plan)
    if component not in present:
        raise UsageError(model_path, f"has no {component} to replace")
    prefixes = sorted(present[component], key=len, reverse=True)
    ours = {t.name: t for t in plan if component_of(t.name) == component}

    def bare(name: str) -> str:
        return next((name[len(p):] for p in prefixes if name.startswith(p)), name)

    theirs = {bare(n): t for n, t in donor.items() if component_of(n) in (component, None)}
    wanted = {bare(n): t for n, t in ours.items()}
    missing = sorted(set(wanted) - set(theirs))
    if missing:
        raise SdtkError(donor_path, f"lacks {len(missing)} of the {len(wanted)} {component} tensors of the model "
                                    f"(e.g. {missing[0]!r}); wrong component or architecture")
    for key, t in wanted.items():
        if tuple(theirs[key].shape) != tuple(t.shape):
            raise SdtkError(donor_path, f"tensor {key} has shape {list(theirs[key].shape)} but the model's has "
                                        f"{list(t.shape)}; wrong architecture")
    out = []
    for t in plan:
        if t.name in ours:
            d = theirs[bare(t.name)]
            t = LazyTensor(t.name, d.dtype, tuple(d.shape), d.loader, d.span)
        out.append(t)
    return ReplaceResult(out, component, len(ours))
