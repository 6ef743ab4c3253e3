"""Which diffusers pipeline each family becomes, and where each component lives on both sides.

Rows: shared reference diffusers-interop.md 1.1 (single-file prefixes), 2.1 (model_index.json
components, classes and flags), 2.6 (schedulers) and 2.7 (tokenizers); architectures.md
(component prefixes). A component is (folder, kind, single-file prefixes (first = written when
nothing else is known), diffusers library and class, weight file stem, options).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class ComponentSpec:
    folder: str  # diffusers subfolder: unet, transformer, vae, text_encoder, ...
    kind: str  # components.py row: unet, vae, clip-hf, open-clip, t5, sd3, flux, identity
    prefixes: Tuple[str, ...]  # in the single file; "" = no prefix (BFL/SAI transformer-only files)
    library: str
    cls: str
    options: Mapping = field(default_factory=dict)

    @property
    def weight_stem(self) -> str:  # diffusers: diffusion_pytorch_model.*, transformers: model.*
        return "model" if self.library == "transformers" else "diffusion_pytorch_model"


@dataclass(frozen=True)
class TokenizerSpec:
    folder: str
    kind: str  # "clip" (written from shipped data) or "t5" (copied from --tokenizers)
    pad: str = "<|endoftext|>"  # SD2 / SDXL tokenizer_2 / SD3 tokenizer_2 pad with "!" (reference 2.7)
    for_encoder: str = "text_encoder"


@dataclass(frozen=True)
class PipelineSpec:
    family: str
    pipeline: str
    components: Tuple[ComponentSpec, ...]
    tokenizers: Tuple[TokenizerSpec, ...]
    scheduler: str  # scheduler row in SCHEDULERS
    flags: Mapping = field(default_factory=dict)
    optional: Tuple[str, ...] = ()  # null components that from_pretrained accepts (_optional_components, 0.42.1)
    inpainting_pipeline: Optional[str] = None  # when the UNet takes 9 input channels


def _unet(options) -> ComponentSpec:
    return ComponentSpec("unet", "unet", (UNET_PREFIX,), "diffusers", "UNet2DConditionModel", options)


def _vae(sample_size: int, prefixes=VAE_PREFIXES) -> ComponentSpec:
    return ComponentSpec("vae", "vae", prefixes, "diffusers", "AutoencoderKL", {"vae_sample_size": sample_size})


_CLIP_L_SD = ComponentSpec("text_encoder", "clip-hf", ("cond_stage_model.transformer.",), "transformers", "CLIPTextModel",
                           {"hidden_act": "quick_gelu"})
_SD_NULLS = {"safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None]}

PIPELINES: Dict[str, PipelineSpec] = {
    "sd1": PipelineSpec(
        "sd1", "StableDiffusionPipeline",
        (_unet({"fixed_heads": 8, "sample_size": 64}), _vae(512), _CLIP_L_SD),
        (TokenizerSpec("tokenizer", "clip"),), "pndm", {**_SD_NULLS, "requires_safety_checker": False},
        ("safety_checker", "feature_extractor", "image_encoder"), "StableDiffusionInpaintPipeline"),
    "sd2": PipelineSpec(
        "sd2", "StableDiffusionPipeline",
        (_unet({"sample_size": 96}), _vae(768),
         # SD2 conditions on the penultimate layer: diffusers keeps 23 of 24 layers, no projection (reference 1.5)
         ComponentSpec("text_encoder", "open-clip", ("cond_stage_model.model.",), "transformers", "CLIPTextModel",
                       {"hidden_act": "gelu", "drop_last_layers": 1, "projection": False})),
        (TokenizerSpec("tokenizer", "clip", pad="!"),), "pndm", {**_SD_NULLS, "requires_safety_checker": False},
        ("safety_checker", "feature_extractor", "image_encoder"), "StableDiffusionInpaintPipeline"),
    "sdxl": PipelineSpec(
        "sdxl", "StableDiffusionXLPipeline",
        (_unet({"sample_size": 128}), _vae(1024),
         ComponentSpec("text_encoder", "clip-hf", ("conditioner.embedders.0.transformer.",), "transformers", "CLIPTextModel",
                       {"hidden_act": "quick_gelu"}),
         ComponentSpec("text_encoder_2", "open-clip", ("conditioner.embedders.1.model.",), "transformers",
                       "CLIPTextModelWithProjection", {"hidden_act": "gelu", "projection": True})),
        (TokenizerSpec("tokenizer", "clip"), TokenizerSpec("tokenizer_2", "clip", pad="!", for_encoder="text_encoder_2")),
        "euler", {"force_zeros_for_empty_prompt": True, "image_encoder": [None, None], "feature_extractor": [None, None]},
        ("image_encoder", "feature_extractor"), "StableDiffusionXLInpaintPipeline"),
    "sdxl-refiner": PipelineSpec(
        "sdxl-refiner", "StableDiffusionXLImg2ImgPipeline",
        (_unet({"sample_size": 128}), _vae(1024),
         ComponentSpec("text_encoder_2", "open-clip", ("conditioner.embedders.0.model.",), "transformers",
                       "CLIPTextModelWithProjection", {"hidden_act": "gelu", "projection": True})),
        (TokenizerSpec("tokenizer_2", "clip", pad="!", for_encoder="text_encoder_2"),), "euler",
        {"text_encoder": [None, None], "tokenizer": [None, None], "requires_aesthetics_score": True,
         "force_zeros_for_empty_prompt": False, "image_encoder": [None, None], "feature_extractor": [None, None]},
        ("image_encoder", "feature_extractor", "text_encoder", "tokenizer")),
    "sd3": PipelineSpec(
        "sd3", "StableDiffusion3Pipeline",
        (ComponentSpec("transformer", "sd3", (UNET_PREFIX, ""), "diffusers", "SD3Transformer2DModel"), _vae(1024),
         # SD3 does not project CLIP-L's pooled output (SAI sd3_impls, ComfyUI): diffusers uses an identity
         # text_projection whatever the file holds (single_file_utils create_diffusers_clip_model_from_ldm)
         ComponentSpec("text_encoder", "clip-hf", ("text_encoders.clip_l.transformer.",), "transformers",
                       "CLIPTextModelWithProjection", {"hidden_act": "quick_gelu", "projection": True,
                                                       "identity_projection": True}),
         ComponentSpec("text_encoder_2", "clip-hf", ("text_encoders.clip_g.transformer.",), "transformers",
                       "CLIPTextModelWithProjection", {"hidden_act": "gelu", "projection": True}),
         ComponentSpec("text_encoder_3", "t5", ("text_encoders.t5xxl.transformer.",), "transformers", "T5EncoderModel")),
        (TokenizerSpec("tokenizer", "clip"), TokenizerSpec("tokenizer_2", "clip", pad="!", for_encoder="text_encoder_2"),
         TokenizerSpec("tokenizer_3", "t5", for_encoder="text_encoder_3")),
        "flow-sd3", {"image_encoder": [None, None], "feature_extractor": [None, None]}, ("image_encoder", "feature_extractor")),
    "flux1": PipelineSpec(
        "flux1", "FluxPipeline",
        (ComponentSpec("transformer", "flux", ("", UNET_PREFIX), "diffusers", "FluxTransformer2DModel"),
         _vae(1024, ("vae.", "first_stage_model.")),  # ComfyUI's FLUX all-in-one files: vae.*
         ComponentSpec("text_encoder", "clip-hf", ("text_encoders.clip_l.transformer.",), "transformers", "CLIPTextModel",
                       {"hidden_act": "quick_gelu"}),
         ComponentSpec("text_encoder_2", "t5", ("text_encoders.t5xxl.transformer.",), "transformers", "T5EncoderModel")),
        (TokenizerSpec("tokenizer", "clip"), TokenizerSpec("tokenizer_2", "t5", for_encoder="text_encoder_2")),
        "flow-flux", {"image_encoder": [None, None], "feature_extractor": [None, None]}, ("image_encoder", "feature_extractor")),
    # Qwen-Image: ComfyUI's files already use diffusers names (reference 1.8); the text encoder
    # (Qwen2.5-VL) has no single-file layout here, so the folder holds the transformer and VAE.
    "qwen-image": PipelineSpec(
        "qwen-image", "QwenImagePipeline",
        (ComponentSpec("transformer", "identity", (UNET_PREFIX, ""), "diffusers", "QwenImageTransformer2DModel"),),
        (), "flow-flux", {}),
    # Lumina-Image 2.0 and Z-Image (reference 1.8): the DiT (+ the FLUX-type VAE of an all-in-one
    # file). Their text encoders (Gemma-2 2B, Qwen3 4B) have no single-file map here: they stay in
    # the sidecar, and the folder names them null (pass text_encoder= and tokenizer= when loading).
    "lumina2": PipelineSpec(
        "lumina2", "Lumina2Pipeline",
        (ComponentSpec("transformer", "lumina2", (UNET_PREFIX, ""), "diffusers", "Lumina2Transformer2DModel"),
         _vae(1024, ("vae.", "first_stage_model."))),
        (), "flow-lumina2", {"text_encoder": [None, None], "tokenizer": [None, None]}),
    "z-image": PipelineSpec(
        "z-image", "ZImagePipeline",
        (ComponentSpec("transformer", "z-image", (UNET_PREFIX, ""), "diffusers", "ZImageTransformer2DModel"),
         _vae(1024, ("vae.", "first_stage_model."))),
        (), "flow-z-image", {"text_encoder": [None, None], "tokenizer": [None, None]}),
}

# Scheduler configs (reference 2.6). Prediction type and zero-terminal SNR are set per model.
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "trained_betas": None, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
SCHEDULERS: Dict[str, Dict] = {
    "pndm": {"_class_name": "PNDMScheduler", **_BETAS, "skip_prk_steps": True, "prediction_type": "epsilon",
             "timestep_spacing": "leading"},
    "ddim": {"_class_name": "DDIMScheduler", **_BETAS, "prediction_type": "epsilon", "timestep_spacing": "leading",
             "rescale_betas_zero_snr": False},
    "euler": {"_class_name": "EulerDiscreteScheduler", **_BETAS, "prediction_type": "epsilon", "timestep_spacing": "leading",
              "interpolation_type": "linear", "use_karras_sigmas": False, "rescale_betas_zero_snr": False},
    "flow-sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "flow-flux": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096},
}
# Lumina-Image-2.0 / Z-Image-Turbo scheduler_config.json on the hub [recalled, not verified here]
SCHEDULERS["flow-lumina2"] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 6.0}
SCHEDULERS["flow-z-image"] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                              "use_dynamic_shifting": False}
FLUX_SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}  # FLUX.1-schnell scheduler_config.json

# diffusers pipeline class -> family (reading folders); inpainting classes read as their base.
PIPELINE_FAMILY = {spec.pipeline: fam for fam, spec in PIPELINES.items()}
PIPELINE_FAMILY.update({spec.inpainting_pipeline: fam for fam, spec in PIPELINES.items() if spec.inpainting_pipeline})


def scheduler_config(spec: PipelineSpec, prediction: Optional[str], zero_snr: bool, schnell: bool = False) -> Dict:
    """The scheduler config of a pipeline: its row, with v-prediction and zero terminal SNR when
    the model has them (v -> DDIM for SD1/SD2, Euler for SDXL; zero SNR needs trailing spacing,
    diffusers PR #3664)."""
    row = spec.scheduler
    if row == "pndm" and (prediction == "v" or zero_snr):
        row = "ddim"
    cfg = dict(SCHEDULERS[row])
    if row.startswith("flow"):
        if schnell:
            cfg.update(FLUX_SCHNELL_SCHEDULER)
        return cfg
    if prediction == "v":
        cfg["prediction_type"] = "v_prediction"
    if zero_snr:
        cfg["rescale_betas_zero_snr"] = True
        cfg["timestep_spacing"] = "trailing"
    return cfg
