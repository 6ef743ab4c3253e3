"""Where each component lives in a single-file checkpoint, per family (key prefixes).

`component_prefixes(architecture)` -> {component: [prefixes, most specific first]}. Component
names follow diffusers where it has one: unet (the diffusion model, UNet or DiT), unet_ema,
vae, text_encoder, text_encoder_2, text_encoder_3, plus ddpm_buffers, model_sampling,
markers and leftovers (training junk). A key belongs to the first (longest) prefix that matches.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

# Source: CompVis ldm (LatentDiffusion attributes model/model_ema/first_stage_model/cond_stage_model),
# sgm (conditioner.embedders.N), ComfyUI comfy/supported_models.py (process_*_state_dict prefixes),
# ComfyUI comfy/sd.py save_checkpoint (text_encoders.*, vae.* for SD3/FLUX all-in-one files).
_UNET = ["model.diffusion_model."]  # ldm/sgm single files; ComfyUI saves DiTs here too
_VAE = ["first_stage_model.", "vae."]  # ldm / ComfyUI all-in-one FLUX
_EMA = ["model_ema."]  # ldm LitEma: dots removed (see ema_key_for)

FAMILY_PREFIXES: Dict[str, Dict[str, List[str]]] = {
    # CompVis v1-inference.yaml: FrozenCLIPEmbedder (HF CLIPTextModel) under cond_stage_model.transformer.
    "sd1": {"unet": _UNET, "unet_ema": _EMA, "vae": _VAE, "text_encoder": ["cond_stage_model.transformer.", "cond_stage_model."]},
    # SD2 v2-inference.yaml: FrozenOpenCLIPEmbedder under cond_stage_model.model.
    "sd2": {"unet": _UNET, "unet_ema": _EMA, "vae": _VAE, "text_encoder": ["cond_stage_model.model.", "cond_stage_model."]},
    "sd2-unclip": {"unet": _UNET, "vae": _VAE, "text_encoder": ["cond_stage_model.model.", "cond_stage_model."],
                   "image_embedder": ["embedder.", "noise_augmentor."]},  # SD2 v2-1-stable-unclip-*.yaml
    "sd-x4-upscaler": {"unet": _UNET, "vae": _VAE, "text_encoder": ["cond_stage_model.model.", "cond_stage_model."]},
    # sgm sd_xl_base.yaml: embedders.0 = FrozenCLIPEmbedder (L), embedders.1 = FrozenOpenCLIPEmbedder2 (G)
    "sdxl": {"unet": _UNET, "vae": _VAE, "text_encoder": ["conditioner.embedders.0.transformer.", "conditioner.embedders.0."],
             "text_encoder_2": ["conditioner.embedders.1.model.", "conditioner.embedders.1."]},
    # sgm sd_xl_refiner.yaml: embedders.0 = FrozenOpenCLIPEmbedder2 (G) only
    "sdxl-refiner": {"unet": _UNET, "vae": _VAE, "text_encoder_2": ["conditioner.embedders.0.model.", "conditioner.embedders.0."]},
    # ComfyUI comfy/supported_models.py SD3 (text_encoders.clip_l/clip_g/t5xxl)
    "sd3": {"unet": _UNET, "vae": _VAE, "text_encoder": ["text_encoders.clip_l."], "text_encoder_2": ["text_encoders.clip_g."],
            "text_encoder_3": ["text_encoders.t5xxl."]},
    # ComfyUI comfy/supported_models.py Flux (clip_l + t5xxl); diffusers FluxPipeline names them text_encoder/_2
    "flux1": {"unet": _UNET, "vae": _VAE, "text_encoder": ["text_encoders.clip_l."], "text_encoder_2": ["text_encoders.t5xxl."]},
    "chroma": {"unet": _UNET, "vae": _VAE, "text_encoder_2": ["text_encoders.t5xxl."]},
}
_DIT_ONLY = {"unet": _UNET, "vae": _VAE}  # FLUX.2, AuraFlow, HunyuanDiT, Lumina 2, Qwen-Image, PixArt, Cascade

# Components every family may hold, whatever the architecture.
# Sources: CompVis ldm/models/diffusion/ddpm.py register_schedule (12 buffers), ComfyUI
# model_base.py (model_sampling.*, v_pred/ztsnr/edm markers read in model_detection.py).
DDPM_BUFFERS: Tuple[str, ...] = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)
MARKER_KEYS: Tuple[str, ...] = (
    "v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min",
)
COMMON_PREFIXES: Dict[str, List[str]] = {
    "model_sampling": ["model.model_sampling."],  # ComfyUI-saved checkpoints (sigmas buffer)
    # Training leftovers (A1111 model-toolkit "junk" list): textual-inversion manager, LoRA
    # weights merged in a checkpoint, ControlNet branch in a non-ControlNet file, Lightning state.
    "leftovers": ["embedding_manager.", "lora_te_", "lora_te1_", "lora_te2_", "lora_unet_", "control_model.",
                  "optimizer_states.", "lr_schedulers.", "model_ema_pre."],
}

COMPONENT_ORDER = ("unet", "unet_ema", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_embedder",
                   "ddpm_buffers", "model_sampling", "markers", "leftovers", "other")


def component_prefixes(architecture_or_family: str) -> Dict[str, List[str]]:
    """{component: [prefixes]} for an architecture id (e.g. "stable-diffusion-xl-v1-base") or a
    family name ("sdxl"). DDPM buffers and markers are exact names (see DDPM_BUFFERS, MARKER_KEYS)."""
    from sdtk.architectures.registry import family_of

    family = family_of(architecture_or_family)
    table = dict(FAMILY_PREFIXES.get(family, _DIT_ONLY))
    table.update(COMMON_PREFIXES)
    return table


def ema_key_for(unet_key: str) -> str:
    """The LitEma key of a UNet key: `model.` dropped, remaining dots removed, under `model_ema.`.
    `model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`.
    Source: CompVis ldm/modules/ema.py (LitEma: name.replace('.', ''))."""
    name = unet_key[len("model."):] if unet_key.startswith("model.") else unet_key
    return "model_ema." + name.replace(".", "")


def ema_map(unet_keys) -> Dict[str, str]:
    """{ema key: unet key} for the given UNet keys (the inverse of ema_key_for, which loses dots)."""
    return {ema_key_for(k): k for k in unet_keys}
