"""Extract components as stand-alone files, in the key layouts the ecosystem loads:

| part | written as | loaded by |
|---|---|---|
| vae | bare LDM keys (`encoder.*`, `decoder.*`, ...) | A1111 `models/VAE`, ComfyUI `models/vae` |
| unet | bare keys (prefix `model.diffusion_model.` removed), plus the file's prediction markers (`v_pred`, `ztsnr`, `edm_*`) as they are | ComfyUI `models/diffusion_models` (UNETLoader) |
| clip-l | HF CLIP layout (`text_model.*`) | ComfyUI `models/text_encoders` |
| clip-g | as stored: OpenCLIP (`transformer.resblocks.*`) for SDXL, HF for all-in-one files | ComfyUI (converts OpenCLIP on load, comfy/sd.py load_clip) |
| open-clip-h | OpenCLIP (SD2) | ComfyUI |
| t5xxl | HF T5 encoder (`encoder.block.*`, `shared.weight`) | ComfyUI |

`text-encoders` means every text encoder the model has, one file each.

The markers travel with the UNet because they belong to it: ComfyUI's UNet loader
(comfy/sd.py load_diffusion_model_state_dict -> supported_models.SDXL.model_type) reads `v_pred` /
`ztsnr` / `edm_vpred.*` from the bare state dict exactly as its checkpoint loader does; without
them it samples an SDXL v-prediction UNet as epsilon (noise). ComfyUI then lists the markers as
"unet unexpected" keys (a log line; the network has no such parameters), as for its own files.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from sdtk.errors import UsageError
from sdtk.ops.components import TEXT_ENCODERS, component_of, component_prefixes_in, is_marker
from sdtk.tensors import LazyTensor

EXTRACTABLE = ("vae", "unet") + TEXT_ENCODERS
EXTRACT_CHOICES = EXTRACTABLE + ("text-encoders",)


def expand_parts(parts: Sequence[str]) -> List[str]:
    out: List[str] = []
    for part in parts:
        for p in part.split(","):
            p = p.strip().lower()
            if not p:
                continue
            if p not in EXTRACT_CHOICES:
                raise UsageError(None, f"--extract {p}: unknown part; choose from {', '.join(EXTRACT_CHOICES)}")
            chosen = list(TEXT_ENCODERS) if p == "text-encoders" else [p]
            out.extend(c for c in chosen if c not in out)
    return out


def extract_plans(plan: Sequence[LazyTensor], parts: Sequence[str], path: str = None) -> Dict[str, List[LazyTensor]]:
    """{part: plan with that component's keys, prefix removed}. Asking for a part the model lacks
    is an error, except within `text-encoders` (where absent encoders are skipped)."""
    present = component_prefixes_in(t.name for t in plan)
    requested_all_te = set(TEXT_ENCODERS).issubset(parts)
    out: Dict[str, List[LazyTensor]] = {}
    for part in parts:
        if part not in present:
            if requested_all_te and part in TEXT_ENCODERS:
                continue
            have = ", ".join(sorted(present)) or "no known component"
            raise UsageError(path, f"has no {part} to extract (it has: {have})")
        prefixes = sorted(present[part], key=len, reverse=True)
        tensors: List[LazyTensor] = []
        for t in plan:
            if part == "unet" and is_marker(t.name):
                tensors.append(t)  # the prediction markers stay with the UNet (module docstring)
                continue
            if component_of(t.name) != part:
                continue
            prefix = next(p for p in prefixes if t.name.startswith(p))
            tensors.append(LazyTensor(t.name[len(prefix):], t.dtype, tuple(t.shape), t.loader, t.span))
        out[part] = tensors
    if not out:
        raise UsageError(path, "has no text encoder to extract")
    return out
