"""The LoRA modules a base model has, and each one's name in every naming convention.

The inverse of the alias table (architectures/lora_keys.py): from a checkpoint's {key: shape}, each
LoRA-able weight (or row slice of one) and the name a given convention writes for it. Sources
(reference/lora.md §1.2-1.3, §3.2, §3.8):
- "kohya" (sd-scripts networks/lora.py, lora_flux.py): `lora_unet_` + module path with '_'; the
  path is the *diffusers* one for SD1/SD2 UNets (kohya's original_unet.py), the SGM one for SDXL
  (sdxl_original_unet.py), BFL's for FLUX (fused qkv / linear1), SAI MMDiT's for SD3; text
  encoders `lora_te_` (one CLIP: SD1, SD2) or `lora_te1_`/`lora_te2_`/`lora_te3_` + the HF CLIP
  path (OpenCLIP's fused in_proj is named as q/k/v row thirds).
- "diffusers" (diffusers save_lora_weights / PEFT): `unet.` + diffusers path, FLUX and SD3
  `transformer.` + diffusers path (q, k, v split: row slices of BFL's / SAI's fused weights; the
  final and SD3's pre-only context adaLN with swapped halves), `text_encoder.` / `text_encoder_2.`
  + HF path.
- "comfyui" (ComfyUI LoraSave, comfy_extras/nodes_lora_extract.py): `diffusion_model.` + the
  checkpoint's module path; text encoders `text_encoders.clip_{l,h,g}.transformer.` + HF path
  (`clip_h` for SD2's OpenCLIP-H: ComfyUI sd2_clip.py; `t5xxl` for T5).
Which modules kohya trains (and extracts) by default: every Linear / 1x1 conv inside UNet
attention blocks (Transformer2DModel), and with a conv rank the ResnetBlock2D / Down- / Upsample2D
layers (3x3 convs at the conv rank, their Linear / 1x1 at the rank); FLUX double/single-block
Linears except norms (flux_extract_lora.py); text encoders' CLIPAttention / CLIPMLP Linears.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from sdtk.architectures.lora_keys import (HF_TEXT_ENCODERS, OPENCLIP_TEXT_ENCODERS, REFINER_OPENCLIP, UNET_PREFIXES,
                                          Target, _openclip_targets, _stand_alone_unet, _unet_family,
                                          flux_diffusers_map, sd3_diffusers_map, sd_unet_to_diffusers, under)

Shape = Tuple[int, ...]
CONVENTIONS = ("kohya", "diffusers", "comfyui")

# ComfyUI's text-encoder names (comfy/sd1_clip.py `clip_{name}`, sd2_clip.py "h", sdxl_clip.py "l"/"g",
# flux.py / sd3_clip.py "t5xxl") by checkpoint prefix.
COMFY_TE = {
    "cond_stage_model.transformer.": "text_encoders.clip_l.transformer.",
    "conditioner.embedders.0.transformer.": "text_encoders.clip_l.transformer.",
    "text_encoders.clip_l.transformer.": "text_encoders.clip_l.transformer.",
    "text_encoders.clip_g.transformer.": "text_encoders.clip_g.transformer.",
    "text_encoders.t5xxl.transformer.": "text_encoders.t5xxl.transformer.",
    "cond_stage_model.model.": "text_encoders.clip_h.transformer.",
    "conditioner.embedders.1.model.": "text_encoders.clip_g.transformer.",
    "conditioner.embedders.0.model.": "text_encoders.clip_g.transformer.",
}
_CLIP_TRAINED = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass(frozen=True)
class Unit:
    """One LoRA module of a base: where it goes, its name, and kohya's class of it."""

    target: Target
    name: str
    group: str  # "attn" (trained by default), "conv" (ResNet / sampler layers: with a conv rank), "te", "other"


def base_kind(shapes: Mapping[str, Shape]) -> Tuple[Optional[str], Optional[str], bool]:
    """(UNet/DiT family "sd" / "flux" / "sd3" / "other" / None, the UNet prefix, is SDXL)."""
    keys = list(shapes)
    prefix = next((p for p in UNET_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if prefix is None and _stand_alone_unet(keys):
        prefix = ""
    if prefix is None:
        return None, None, False
    fam = _unet_family({k[len(prefix):] for k in keys if k.startswith(prefix)})
    sdxl = fam == "sd" and any(k.startswith(prefix + "label_emb.") for k in keys)
    return fam, prefix, sdxl


def _unet_weights(shapes: Mapping[str, Shape], prefix: str) -> Dict[str, Tuple[str, Optional[str]]]:
    """{module path: (weight key, bias key)} of the UNet/DiT's 2-D and 4-D weights."""
    out = {}
    skip = ("text_encoders.", "vae.", "first_stage_model.", "conditioner.", "cond_stage_model.")
    for k, s in shapes.items():
        if k.startswith(prefix) and k.endswith(".weight") and len(s) in (2, 4):
            rel = k[len(prefix):-len(".weight")]
            if not rel.startswith(skip):
                b = prefix + rel + ".bias"
                out[rel] = (k, b if b in shapes else None)
    return out


def _sd_group(diff: str) -> str:
    if ".attentions." in diff:
        return "attn"
    if ".resnets." in diff or "samplers." in diff:
        return "conv"
    return "other"


def unet_units(shapes: Mapping[str, Shape], convention: str) -> List[Unit]:
    fam, prefix, sdxl = base_kind(shapes)
    if fam is None:
        return []
    mods = _unet_weights(shapes, prefix)
    units: List[Unit] = []
    if fam == "sd":
        diff = sd_unet_to_diffusers(mods)
        for rel, (w, b) in mods.items():
            d = diff.get(rel)
            group = _sd_group(d) if d else "other"
            if convention == "kohya":
                name = "lora_unet_" + under(rel if sdxl or d is None else d)
            elif convention == "diffusers":
                if d is None:
                    continue
                name = "unet." + d
            else:
                name = "diffusion_model." + rel
            units.append(Unit(Target(w, b), name, group))
        return units
    if fam in ("flux", "sd3") and convention == "diffusers":
        dmap = (flux_diffusers_map if fam == "flux" else sd3_diffusers_map)({m: shapes[wb[0]] for m, wb in mods.items()})
        blocks = ("double_blocks.", "single_blocks.") if fam == "flux" else ("joint_blocks.",)
        for d, (native, rows, swap) in dmap.items():
            w, b = mods[native]
            group = "attn" if native.startswith(blocks) and "norm" not in native and ".ln_" not in native else "other"
            units.append(Unit(Target(w, b, rows=rows, swap_halves=swap), "transformer." + d, group))
        return units
    for rel, (w, b) in mods.items():
        if fam == "flux":
            group = "attn" if rel.startswith(("double_blocks.", "single_blocks.")) and "norm" not in rel else "other"
        elif fam == "sd3":
            group = "attn" if rel.startswith("joint_blocks.") else "other"
        else:
            group = "attn"
        name = {"kohya": "lora_unet_" + under(rel), "comfyui": "diffusion_model." + rel, "diffusers": "transformer." + rel}[convention]
        units.append(Unit(Target(w, b), name, group))
    return units


def te_units(shapes: Mapping[str, Shape], convention: str) -> List[Unit]:
    keys = list(shapes)
    has_clip_g = any(k.startswith("text_encoders.clip_g.") for k in keys)
    found: List[Tuple[str, str, Dict[str, Target]]] = []  # (checkpoint prefix, component, {HF path: target})
    for prefix, comp, _, _ in HF_TEXT_ENCODERS:
        inner = {}
        for k, s in shapes.items():
            if k.startswith(prefix) and k.endswith(".weight") and len(s) == 2:
                m = k[len(prefix):-len(".weight")]
                b = prefix + m + ".bias"
                inner[m] = Target(k, b if b in shapes else None, component=comp)
        if inner:
            found.append((prefix, comp, inner))
    openclip = list(OPENCLIP_TEXT_ENCODERS)
    if any(k.startswith(REFINER_OPENCLIP[0]) for k in keys):
        openclip.append(REFINER_OPENCLIP)
    for prefix, comp, _, _ in openclip:
        inner = _openclip_targets(prefix, shapes, comp)
        if inner:
            found.append((prefix, comp, inner))
    single = len(found) == 1
    units: List[Unit] = []
    for prefix, comp, inner in found:
        for path, t in inner.items():
            if convention == "kohya":
                name = ("lora_te_" if single and comp == "te1" else f"lora_{comp}_") + under(path)
            elif convention == "diffusers":
                d = {"te1": "text_encoder.", "te2": "text_encoder_2.", "te3": "text_encoder_3." if has_clip_g else "text_encoder_2."}[comp]
                name = d + path
            else:
                name = COMFY_TE[prefix] + path
            units.append(Unit(t, name, "te" if _CLIP_TRAINED.search(path) else "other"))
    return units


def base_units(shapes: Mapping[str, Shape], convention: str) -> List[Unit]:
    """Every LoRA module of the base in `convention` ("kohya", "diffusers", "comfyui")."""
    if convention not in CONVENTIONS:
        raise ValueError(convention)
    return unet_units(shapes, convention) + te_units(shapes, convention)
