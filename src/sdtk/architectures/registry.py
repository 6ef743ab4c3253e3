"""Every architecture id sdtk names: family, what the file kind is, what a complete file holds,
and which shared layout (if any) gives its full key set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from sdtk.architectures.signatures import VARIANTS


@dataclass(frozen=True)
class Architecture:
    id: str
    family: str
    title: str  # the name people use
    modelspec: bool  # True when the id is ModelSpec's own
    full_components: Tuple[str, ...]  # what an all-in-one checkpoint of it holds
    layouts: Tuple[str, ...] = ()  # sdtk.samples layouts giving its known key set (first wins per component)
    prediction: Optional[str] = None  # prediction type fixed by the architecture ("flow" for rectified flow)


_SD = ("unet", "vae", "text_encoder")
_XL = ("unet", "vae", "text_encoder", "text_encoder_2")

# Sources: ModelSpec README architecture list (Stability-AI/ModelSpec), ComfyUI supported_models.py
# (components each model loads), the layouts' own descriptions (sdtk/data/layouts/SOURCE.md).
_ROWS = (
    # id                                   family         title                                     modelspec full components                          layouts                                   prediction
    ("stable-diffusion-v1", "sd1", "Stable Diffusion 1.x", True, _SD, ("sd15-emaonly", "sd15-full-ema"), None),
    ("stable-diffusion-v1-inpainting", "sd1", "Stable Diffusion 1.x Inpainting", True, _SD, ("sd15-inpainting", "sd15-emaonly"), None),
    ("stable-diffusion-v1-instruct-pix2pix", "sd1", "InstructPix2Pix (SD 1.x)", False, _SD, (), None),
    ("stable-diffusion-v2", "sd2", "Stable Diffusion 2.x (512 or 768-v)", False, _SD, ("sd21-768-v",), None),
    ("stable-diffusion-v2-512", "sd2", "Stable Diffusion 2.x 512 (epsilon)", True, _SD, ("sd21-768-v",), "epsilon"),
    ("stable-diffusion-v2-768-v", "sd2", "Stable Diffusion 2.x 768-v (v-prediction)", True, _SD, ("sd21-768-v",), "v"),
    ("stable-diffusion-v2-inpainting", "sd2", "Stable Diffusion 2 Inpainting", False, _SD, (), "epsilon"),
    ("stable-diffusion-v2-depth", "sd2", "Stable Diffusion 2 Depth", False, _SD, (), "epsilon"),
    ("stable-diffusion-v2-unclip-l", "sd2-unclip", "Stable Diffusion 2.1 unCLIP (L)", False, _SD, (), "v"),
    ("stable-diffusion-v2-unclip-h", "sd2-unclip", "Stable Diffusion 2.1 unCLIP (H)", False, _SD, (), "v"),
    ("stable-diffusion-x4-upscaler", "sd-x4-upscaler", "Stable Diffusion x4 Upscaler", False, _SD, (), "v"),
    ("stable-diffusion-xl-v1-base", "sdxl", "Stable Diffusion XL 1.0", True, _XL, ("sdxl-base",), None),
    ("stable-diffusion-xl-v1-inpainting", "sdxl", "Stable Diffusion XL Inpainting", False, _XL, (), None),
    ("stable-diffusion-xl-v1-instruct-pix2pix", "sdxl", "InstructPix2Pix (SDXL)", False, _XL, (), None),
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner", "Stable Diffusion XL 1.0 Refiner", True, ("unet", "vae", "text_encoder_2"), (), None),
    ("ssd-1b", "sdxl", "Segmind SSD-1B (distilled SDXL)", False, _XL, (), None),
    ("segmind-vega", "sdxl", "Segmind Vega (distilled SDXL)", False, _XL, (), None),
    ("playground-v2.5", "sdxl", "Playground v2.5 (SDXL architecture, EDM)", False, _XL, ("sdxl-base",), "edm"),
    ("stable-diffusion-v3-medium", "sd3", "Stable Diffusion 3 Medium", True, ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), ("sd3-medium-incl-clips",), "flow"),
    ("stable-diffusion-v3.5-medium", "sd3", "Stable Diffusion 3.5 Medium", False, ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), (), "flow"),
    ("stable-diffusion-v3.5-large", "sd3", "Stable Diffusion 3.5 Large", False, ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), (), "flow"),
    ("stable-diffusion-v3", "sd3", "Stable Diffusion 3 (MMDiT)", False, ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), (), "flow"),
    ("flux-1-dev", "flux1", "FLUX.1 [dev]", True, ("unet", "vae", "text_encoder", "text_encoder_2"), ("flux1-dev-aio", "flux1-dev"), "flow"),
    ("flux-1-schnell", "flux1", "FLUX.1 [schnell]", True, ("unet", "vae", "text_encoder", "text_encoder_2"), ("flux1-schnell", "flux1-dev-aio"), "flow"),
    ("flux-1-fill-dev", "flux1", "FLUX.1 Fill [dev] (inpainting/outpainting)", False, ("unet", "vae", "text_encoder", "text_encoder_2"), (), "flow"),
    ("flux-1-depth-dev", "flux1", "FLUX.1 Depth [dev] (or Canny [dev]: same shapes)", False, ("unet", "vae", "text_encoder", "text_encoder_2"), (), "flow"),
    ("flux-2", "flux2", "FLUX.2", False, ("unet", "vae"), (), "flow"),
    ("chroma", "chroma", "Chroma (FLUX.1-schnell derivative)", False, ("unet", "vae", "text_encoder_2"), (), "flow"),
    ("auraflow", "auraflow", "AuraFlow", False, ("unet", "vae"), (), "flow"),
    ("hunyuan-dit", "hunyuan-dit", "HunyuanDiT", False, ("unet", "vae"), (), None),
    ("lumina-2", "lumina2", "Lumina-Image 2.0", False, ("unet", "vae"), (), "flow"),
    ("z-image", "lumina2", "Z-Image", False, ("unet", "vae"), (), "flow"),
    ("qwen-image", "qwen-image", "Qwen-Image", False, ("unet", "vae"), (), "flow"),
    ("pixart-alpha", "pixart", "PixArt-alpha", False, ("unet", "vae"), (), None),
    ("pixart-sigma", "pixart", "PixArt-Sigma", False, ("unet", "vae"), (), None),
    ("stable-cascade-stage-c", "stable-cascade", "Stable Cascade stage C", False, ("unet",), (), None),
    ("stable-cascade-stage-b", "stable-cascade", "Stable Cascade stage B", False, ("unet",), (), None),
)

ARCHITECTURES: Dict[str, Architecture] = {r[0]: Architecture(*r) for r in _ROWS}
_FAMILIES = {a.family for a in ARCHITECTURES.values()}


def family_of(architecture_or_family: str) -> str:
    """The family of an architecture id ("stable-diffusion-v1-inpainting" -> "sd1"); a family name
    is returned as is; adapters' ids ("stable-diffusion-v1/lora") give the base's family."""
    base = architecture_or_family.split("/", 1)[0]
    if base in ARCHITECTURES:
        return ARCHITECTURES[base].family
    return base if base in _FAMILIES else "unknown"


def architecture(arch_id: str) -> Optional[Architecture]:
    return ARCHITECTURES.get(arch_id.split("/", 1)[0])


def title_of(arch) -> str:
    """The human title of an architecture id ("stable-diffusion-v1/lora" -> its family's title);
    the id itself when unknown, "?" when empty."""
    if not arch:
        return "?"
    a = architecture(str(arch))
    return a.title if a else str(arch)


def _check_tables() -> None:  # every variant row names a registered architecture
    missing = {v.architecture for v in VARIANTS} - set(ARCHITECTURES)
    assert not missing, f"variant rows name unregistered architectures: {missing}"


_check_tables()
