"""What kind of model a catalogue is, for merging: family, components, and the compatibility
check that refuses different architectures before any work (A1111 broadcasts an SD1 tensor
against an SDXL one and tries to allocate 335 GB; we compare names and shapes first).

Uses `sdtk.identify` when it is available; the small fallback table below keeps merge working
without it."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from sdtk.errors import SdtkError

FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "FLUX", "sd3": "SD3"}

# Component of a key by prefix. Sources: the checkpoint layouts in sdtk.data.layouts (LDM /
# A1111 single-file names: model.diffusion_model, cond_stage_model, conditioner.embedders,
# first_stage_model; ComfyUI all-in-one FLUX: text_encoders, vae).
COMPONENT_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet"),
    ("cond_stage_model.", "te"),
    ("conditioner.embedders.", "te"),
    ("text_encoders.", "te"),
    ("first_stage_model.", "vae"),
    ("vae.", "vae"),
    ("model_ema.", "ema"),
)

# First convolution of the UNet: 9 input channels for inpainting, 8 for instruct-pix2pix
# (A1111 modules/extras.py `run_modelmerger`, the `result_is_inpainting_model` rule).
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
LATENT_CHANNELS = 4

# SD1 vs SD2 vs SDXL by the cross-attention context width (768 CLIP-L, 1024 OpenCLIP-H, 2048
# CLIP-L + OpenCLIP-bigG). Source: the model configs (context_dim) of SD1.x, SD2.x, SDXL.
_ATTN2_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def component_of(key: str) -> str:
    for prefix, comp in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return comp
    return "other" if "." in key else "top"


def detect_family(shapes: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    """sd1 / sd2 / sdxl / flux / sd3 / None, from key names and a few shapes."""
    names = shapes.keys()
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in names):
        return "flux"
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in names):
        return "sd3"
    if any(k.startswith("conditioner.embedders.") or k.startswith("model.diffusion_model.label_emb.") for k in names):
        return "sdxl"
    if _ATTN2_K in shapes and len(shapes[_ATTN2_K]) == 2:
        fam = _CONTEXT_FAMILY.get(shapes[_ATTN2_K][1])
        if fam:
            return fam
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in names):
        return "sd1"
    return None


def family_of(cat) -> Optional[str]:
    """The family of an open Catalogue (identify's architecture when available)."""
    try:  # the identify helper's API, when it has landed
        from sdtk.identify import identify  # type: ignore

        arch = str(getattr(identify(cat), "architecture", "") or "").lower()
        for fam in ("sdxl", "sd1", "sd2", "flux", "sd3"):
            if arch.startswith(fam) or arch.replace(".", "").replace("-", "").startswith(fam):
                return fam
    except Exception:
        pass
    return detect_family({k: tuple(t.shape) for k, t in cat.tensors.items()})


def family_label(family: Optional[str]) -> str:
    return FAMILY_NAMES.get(family or "", "an unrecognised model")


def is_channel_extension(key: str, primary_shape, other_shape) -> bool:
    """The inpainting / instruct-pix2pix first conv against a normal one: same shape except more
    input channels in the primary (A1111 merges [:, 0:4] and keeps the rest)."""
    return (key == FIRST_CONV and len(primary_shape) == 4 and len(other_shape) == 4
            and primary_shape[0] == other_shape[0] and primary_shape[2:] == other_shape[2:]
            and other_shape[1] == LATENT_CHANNELS and primary_shape[1] > LATENT_CHANNELS)


def check_compatible(labels: List[str], families: List[Optional[str]], shapes: List[Dict[str, Tuple[int, ...]]]) -> None:
    """Refuse inputs that are not the same architecture, before reading any tensor.

    Three checks: the detected families agree; the inputs share most keys; no common key has
    different shapes (except the inpainting/ip2p first conv of the primary)."""
    primary_label, primary_family, primary = labels[0], families[0], shapes[0]
    for label, fam, other in zip(labels[1:], families[1:], shapes[1:]):
        if fam != primary_family:
            raise SdtkError(label, f"is {family_label(fam)} but {primary_label} is {family_label(primary_family)}: "
                                   "different architectures cannot be merged")
        common = primary.keys() & other.keys()
        smaller = min(len(primary), len(other)) or 1
        if len(common) < 0.5 * smaller:
            raise SdtkError(label, f"shares only {len(common)} of {smaller} tensor names with {primary_label}: "
                                   "different architectures or component sets cannot be merged")
        for key in primary:
            if key not in other or primary[key] == other[key]:
                continue
            if is_channel_extension(key, primary[key], other[key]):
                continue
            if key == FIRST_CONV and len(other[key]) == 4 and len(primary[key]) == 4 and other[key][1] > primary[key][1]:
                raise SdtkError(label, f"has a {other[key][1]}-channel first convolution (inpainting/instruct-pix2pix) but "
                                       f"{primary_label} has {primary[key][1]}: give the {other[key][1]}-channel model as the first model (A)")
            raise SdtkError(label, f"tensor {key!r} is {list(other[key])} but {list(primary[key])} in {primary_label}: "
                                   "different architectures cannot be merged")
