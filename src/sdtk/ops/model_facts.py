"""The facts `convert` and `merge` need about a model (sdtk.identify.facts.ModelFacts:
architecture, family, prediction type with its confidence and evidence, EMA presence). From
`sdtk.identify` (shape signatures, markers, metadata, the `<model>.yaml` beside the file); when
identify cannot match the shapes (a damaged file), from key-name tells alone.

Sources of the tells: shared reference "architectures.md" (ComfyUI `model_detection.py`,
A1111 `sd_models_config.py`); ModelSpec architecture ids (Stability AI ModelSpec).
"""
from __future__ import annotations

from typing import Mapping

from sdtk.formats.catalogue import Catalogue
from sdtk.identify.facts import MODELSPEC_PREDICTIONS, ModelFacts, facts_of  # noqa: F401 (re-exported)
from sdtk.ops.ema import has_ema
from sdtk.tensors import LazyTensor

UNET = "model.diffusion_model."

# Key-name tells, first match wins: (architecture, key that must be present).
KEY_TELLS = (
    ("flux-1-dev", UNET + "guidance_in.in_layer.weight"),  # ComfyUI model_detection: FLUX dev has guidance_in
    ("flux-1-schnell", UNET + "double_blocks.0.img_attn.norm.key_norm.scale"),  # FLUX without guidance_in
    ("stable-diffusion-v3-medium", UNET + "joint_blocks.0.context_block.attn.qkv.weight"),  # MMDiT
    ("stable-diffusion-xl-v1-refiner", "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"),
    ("stable-diffusion-xl-v1-base", UNET + "label_emb.0.0.weight"),  # SDXL adm embedding
    ("stable-diffusion-v2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),  # OpenCLIP-H
    ("stable-diffusion-v1", UNET + "input_blocks.0.0.weight"),  # any SD UNet; SD1 when no other tell
)


def model_facts(cat: Catalogue, config=None, deep: bool = False) -> ModelFacts:
    """`config`: the `<model>.yaml` beside the file (sdtk.identify.config_yaml.read_config_beside),
    None when not looked for; `deep`: also run the value check (SD2 prediction type)."""
    from sdtk.identify import identify

    ident = identify(cat, config=config, deep_prediction=deep)
    has = has_ema(cat.tensors)
    if ident.kind in ("checkpoint", "diffusion-model") and ident.architecture != "unknown":
        return facts_of(ident, has or ident.has_ema)
    if ident.kind not in ("checkpoint", "diffusion-model", "unknown") and ident.architecture != "unknown":
        return ModelFacts(ident.architecture, None, "unknown", has, "identify", kind=ident.kind)  # LoRA, VAE, ...
    return _facts_from_key_names(cat.tensors, cat.metadata, has)


def _facts_from_key_names(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str], has: bool) -> ModelFacts:
    arch = next((a for a, key in KEY_TELLS if key in tensors), None)
    stated = metadata.get("modelspec.prediction_type") or metadata.get("modelspec.predict_key")
    confidence = "high"
    if "v_pred" in tensors or "edm_vpred.sigma_max" in tensors:
        prediction, source = "v", "marker"
    elif stated in MODELSPEC_PREDICTIONS:
        prediction, source = stated, "modelspec"
    elif arch and (arch.startswith("stable-diffusion-v1") or arch.startswith("stable-diffusion-xl")):
        prediction, source, confidence = "epsilon", "family-default", "medium"
    elif arch and arch.startswith("flux"):
        prediction, source = "flow", "architecture"
    else:
        prediction, source, confidence = None, "unknown", "none"
    return ModelFacts(arch, prediction, source, has, "key names", confidence, "ztsnr" in tensors)
