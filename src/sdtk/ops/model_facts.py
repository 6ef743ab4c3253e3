"""The few facts `convert` needs about a model: architecture (ModelSpec id), family, prediction
type, EMA presence. From `sdtk.identify` (shape signatures); when identify cannot match the
shapes (a damaged file, or the scaled-down files of the tests), from key-name tells alone.

Sources of the tells: shared reference "architectures.md" (ComfyUI `model_detection.py`,
A1111 `sd_models_config.py`); ModelSpec architecture ids (Stability AI ModelSpec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from sdtk.formats.catalogue import Catalogue
from sdtk.ops.ema import has_ema
from sdtk.tensors import LazyTensor

UNET = "model.diffusion_model."

# Key-name tells, first match wins: (ModelSpec architecture, key that must be present).
KEY_TELLS = (
    ("flux-1-dev", UNET + "guidance_in.in_layer.weight"),  # ComfyUI model_detection: FLUX dev has guidance_in
    ("flux-1-schnell", UNET + "double_blocks.0.img_attn.norm.key_norm.scale"),  # FLUX without guidance_in
    ("stable-diffusion-v3-medium", UNET + "joint_blocks.0.context_block.attn.qkv.weight"),  # MMDiT
    ("stable-diffusion-xl-v1-refiner", "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"),
    ("stable-diffusion-xl-v1-base", UNET + "label_emb.0.0.weight"),  # SDXL adm embedding
    ("stable-diffusion-v2-512", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),  # OpenCLIP-H
    ("stable-diffusion-v1", UNET + "input_blocks.0.0.weight"),  # any SD UNet; SD1 when no other tell
)
# ModelSpec `prediction_type` takes these values only (ecosystem.md); flow/edm are not recorded there.
MODELSPEC_PREDICTIONS = ("epsilon", "v")
FAMILIES = (("flux", "flux"), ("stable-diffusion-v3", "sd3"), ("stable-diffusion-xl", "sdxl"),
            ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))


@dataclass
class ModelFacts:
    architecture: Optional[str]  # ModelSpec id, e.g. "stable-diffusion-v1"; None when unknown
    prediction_type: Optional[str]  # "epsilon", "v", "flow", "edm" or None
    prediction_source: str
    has_ema: bool
    identified_by: str  # "identify" or "key names"

    @property
    def family(self) -> str:
        a = self.architecture or ""
        return next((fam for prefix, fam in FAMILIES if a.startswith(prefix)), "unknown")

    @property
    def modelspec_prediction(self) -> Optional[str]:
        return self.prediction_type if self.prediction_type in MODELSPEC_PREDICTIONS else None


def model_facts(cat: Catalogue) -> ModelFacts:
    from sdtk.identify import identify

    ident = identify(cat)
    has = has_ema(cat.tensors)
    if ident.kind in ("checkpoint", "diffusion-model") and ident.architecture != "unknown":
        arch = _modelspec_sd2(ident.architecture, ident.prediction_type)
        return ModelFacts(arch, ident.prediction_type, ident.prediction_source or "unknown", has or ident.has_ema, "identify")
    return _facts_from_key_names(cat.tensors, cat.metadata, has)


def _modelspec_sd2(arch: str, prediction: Optional[str]) -> str:
    """identify says "stable-diffusion-v2"; ModelSpec names SD2 by resolution and prediction."""
    if arch == "stable-diffusion-v2":
        return "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    return arch


def _facts_from_key_names(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str], has: bool) -> ModelFacts:
    arch = next((a for a, key in KEY_TELLS if key in tensors), None)
    stated = metadata.get("modelspec.prediction_type") or metadata.get("modelspec.predict_key")
    if stated in MODELSPEC_PREDICTIONS:
        prediction, source = stated, "metadata"
    elif "v_pred" in tensors or "edm_vpred.sigma_max" in tensors:
        prediction, source = "v", "marker"
    elif arch and (arch.startswith("stable-diffusion-v1") or arch.startswith("stable-diffusion-xl")):
        prediction, source = "epsilon", "family-default"
    elif arch and arch.startswith("flux"):
        prediction, source = "flow", "architecture"
    else:
        prediction, source = None, "unknown"
    if arch == "stable-diffusion-v2-512" and prediction == "v":
        arch = "stable-diffusion-v2-768-v"
    return ModelFacts(arch, prediction, source, has, "key names")

