"""The few facts `convert` needs about a model: architecture (ModelSpec id), prediction type,
EMA presence, components. A local stand-in for `sdtk.identify` (same answers for the files
convert handles); `model_facts(tensors, metadata)` is the single entry point to switch over.

Sources: shared reference "architectures.md" (ComfyUI `model_detection.py`, Forge's context-width
shortcut, A1111 `sd_models_config.py`) and ModelSpec architecture ids (Stability AI ModelSpec).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import numpy as np

from sdtk.ops.components import component_prefixes_in
from sdtk.ops.ema import has_ema
from sdtk.tensors import LazyTensor

UNET = "model.diffusion_model."

# Tells by key presence, first match wins: (ModelSpec architecture, key that must be present).
KEY_TELLS = (
    ("flux-1-dev", UNET + "guidance_in.in_layer.weight"),  # ComfyUI model_detection: FLUX dev has guidance_in
    ("flux-1-schnell", UNET + "double_blocks.0.img_attn.norm.key_norm.scale"),  # FLUX without guidance_in
    ("stable-diffusion-v3-medium", UNET + "joint_blocks.0.context_block.attn.qkv.weight"),  # MMDiT
    ("stable-diffusion-xl-v1-refiner", "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"),
    ("stable-diffusion-xl-v1-base", UNET + "label_emb.0.0.weight"),  # SDXL adm embedding
    ("stable-diffusion-v2-512", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),  # OpenCLIP-H
    ("stable-diffusion-v1", UNET + "input_blocks.0.0.weight"),  # any SD UNet; SD1 when no other tell
)
INPAINT_SUFFIX = {"stable-diffusion-v1": "stable-diffusion-v1-inpainting"}
# ComfyUI model_detection: SD2 is v-prediction when this bias's std exceeds 0.09.
SD2_V_TELL = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
MARKER_PREDICTIONS = (("v_pred", "v"), ("edm_vpred.sigma_max", "v"))  # ComfyUI/Forge markers


@dataclass
class ModelFacts:
    architecture: Optional[str]  # ModelSpec id, e.g. "stable-diffusion-v1"; None when unknown
    prediction_type: Optional[str]  # "epsilon", "v" or None
    prediction_source: str  # how we know: "metadata", "marker", "heuristic", "default", "unknown"
    has_ema: bool
    components: Dict[str, list] = field(default_factory=dict)

    @property
    def family(self) -> str:
        a = self.architecture or ""
        if a.startswith("flux"):
            return "flux"
        if a.startswith("stable-diffusion-v3"):
            return "sd3"
        if a.startswith("stable-diffusion-xl"):
            return "sdxl"
        if a.startswith("stable-diffusion-v2"):
            return "sd2"
        if a.startswith("stable-diffusion-v1"):
            return "sd1"
        return "unknown"


def model_facts(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str]) -> ModelFacts:
    names = tensors.keys()
    arch = next((a for a, key in KEY_TELLS if key in tensors), None)
    first_conv = tensors.get(UNET + "input_blocks.0.0.weight")
    if arch in INPAINT_SUFFIX and first_conv is not None and len(first_conv.shape) == 4 and first_conv.shape[1] == 9:
        arch = INPAINT_SUFFIX[arch]
    prediction, source = _prediction(tensors, metadata, arch)
    if arch == "stable-diffusion-v2-512" and prediction == "v":
        arch = "stable-diffusion-v2-768-v"
    return ModelFacts(arch, prediction, source, has_ema(names), component_prefixes_in(names))


def _prediction(tensors, metadata, arch):
    stated = metadata.get("modelspec.prediction_type") or metadata.get("modelspec.predict_key")
    if stated in ("epsilon", "v"):
        return stated, "metadata"
    for marker, prediction in MARKER_PREDICTIONS:
        if marker in tensors:
            return prediction, "marker"
    if arch == "stable-diffusion-v2-512" and SD2_V_TELL in tensors:
        bias = np.asarray(tensors[SD2_V_TELL].read(), dtype=np.float32)
        return ("v" if float(bias.std()) > 0.09 else "epsilon"), "heuristic"
    if arch and (arch.startswith("stable-diffusion-v1") or arch.startswith("stable-diffusion-xl")):
        return "epsilon", "default"
    return None, "unknown"
