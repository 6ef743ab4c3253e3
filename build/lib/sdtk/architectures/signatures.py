"""Diffusion-model families and their variants, told apart by key names and shapes.

Two tables, both read first-match-wins:
- FAMILIES: which network this is (SD1 UNet, SDXL UNet, FLUX DiT, ...), with the key whose
  shape gives its input channels. Keys are relative to the diffusion-model prefix
  (`model.diffusion_model.` in single-file checkpoints, nothing in bare files).
- VARIANTS: per family, the architecture id and variant (inpainting, refiner, dev/schnell, ...).
  Every family ends with a default row.

Architecture ids are ModelSpec ids where ModelSpec has one (`stable-diffusion-v1`,
`stable-diffusion-xl-v1-base`, `flux-1-dev`, ...); our own ids follow the same pattern and are
listed in docs/inspect.md ("Architecture ids").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from sdtk.architectures.match import Condition


@dataclass(frozen=True)
class Family:
    name: str  # our family name: sd1, sd2, sdxl, sdxl-refiner, flux1, sd3, ...
    implementation: str  # key naming: "ldm" (CompVis/sgm/BFL/SAI originals) or "diffusers"
    conditions: Tuple[Condition, ...]
    in_channels_key: Optional[Tuple[str, int]]  # (key, axis) giving the input channels
    source: str
    network: str = "unet"  # "unet" or "dit": how reports call the diffusion model


@dataclass(frozen=True)
class Variant:
    family: str
    conditions: Tuple[Condition, ...]
    architecture: str
    variant: Optional[str]
    source: str
    notes: Tuple[str, ...] = field(default_factory=tuple)


_X = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"  # Forge's context-width key
_X1 = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # SD1/SD2 (SDXL has no attention at level 1)
_IN = ("input_blocks.0.0.weight", 1)
_DIFF_CTX = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"

FAMILIES: Tuple[Family, ...] = (
    # ---- UNets, original (LDM/sgm) key names --------------------------------------------------
    Family("sdxl-refiner", "ldm", (("dim", "input_blocks.0.0.weight", 0, 384), ("dim", "label_emb.0.0.weight", 1, 2560)), _IN,
           "ComfyUI comfy/supported_models.py SDXLRefiner (model_channels 384, adm 2560); sgm configs/inference/sd_xl_refiner.yaml"),
    Family("sdxl", "ldm", (("dim", "label_emb.0.0.weight", 1, 2816), ("dim", _X, 1, 2048)), _IN,
           "ComfyUI comfy/model_detection.py (context_dim 2048, adm_in_channels 2816); sgm configs/inference/sd_xl_base.yaml"),
    Family("sd-x4-upscaler", "ldm", (("dim", "input_blocks.0.0.weight", 0, 256), ("dim", "input_blocks.0.0.weight", 1, 7)), _IN,
           "ComfyUI comfy/supported_models.py SD_X4Upscaler (model_channels 256, in_channels 7); SD2 configs x4-upscaling.yaml"),
    Family("sd2-unclip", "ldm", (("dim", "label_emb.0.0.weight", 1, (1536, 2048)), ("dim", _X1, 1, 1024)), _IN,
           "ComfyUI comfy/supported_models.py SD21UnclipL/H (adm_in_channels 1536 / 2048); SD2 configs v2-1-stable-unclip-*.yaml"),
    Family("sd2", "ldm", (("dim", _X1, 1, 1024), ("ndim", "input_blocks.1.1.proj_in.weight", 2)), _IN,
           "ComfyUI comfy/model_detection.py (context_dim 1024, use_linear_in_transformer); A1111 sd_models_config.py"),
    Family("sd1", "ldm", (("dim", _X1, 1, 768), ("ndim", "input_blocks.1.1.proj_in.weight", 4)), _IN,
           "ComfyUI comfy/model_detection.py (context_dim 768, conv proj_in); CompVis configs/stable-diffusion/v1-inference.yaml"),
    # ---- UNets, diffusers key names (diffusion_pytorch_model.safetensors) ------------------------
    Family("sdxl", "diffusers", (("dim", "add_embedding.linear_1.weight", 1, 2816), ("has", "conv_in.weight")), ("conv_in.weight", 1),
           "diffusers UNet2DConditionModel (addition_embed_type text_time, projection_class_embeddings_input_dim 2816)"),
    Family("sd2", "diffusers", (("dim", _DIFF_CTX, 1, 1024), ("has", "conv_in.weight")), ("conv_in.weight", 1),
           "diffusers UNet2DConditionModel (cross_attention_dim 1024)"),
    Family("sd1", "diffusers", (("dim", _DIFF_CTX, 1, 768), ("has", "conv_in.weight")), ("conv_in.weight", 1),
           "diffusers UNet2DConditionModel (cross_attention_dim 768)"),
    # ---- DiTs ----------------------------------------------------------------------------------
    Family("sd3", "ldm", (("has", "joint_blocks.0.context_block.attn.qkv.weight"),), ("x_embedder.proj.weight", 1),
           "ComfyUI comfy/model_detection.py (joint_blocks -> MMDiT); sd3 reference sd3_impls.py", "dit"),
    Family("flux2", "ldm", (("has", "double_stream_modulation_img.lin.weight"),), ("img_in.weight", 1),
           "ComfyUI comfy/model_detection.py (Flux2: double_stream_modulation_img)", "dit"),
    Family("chroma", "ldm", (("has", "distilled_guidance_layer.in_proj.weight"), ("has", "double_blocks.0.img_attn.norm.key_norm.scale")), ("img_in.weight", 1),
           "ComfyUI comfy/model_detection.py (Chroma: distilled_guidance_layer)", "dit"),
    Family("flux1", "ldm", (("has", "double_blocks.0.img_attn.norm.key_norm.scale"), ("has", "img_in.weight")), ("img_in.weight", 1),
           "ComfyUI comfy/model_detection.py (Flux); BFL flux src/flux/model.py", "dit"),
    Family("flux1", "diffusers", (("has", "transformer_blocks.0.attn.norm_added_k.weight"), ("has", "single_transformer_blocks.0.attn.norm_k.weight"), ("has", "x_embedder.weight")), ("x_embedder.weight", 1),
           "diffusers FluxTransformer2DModel", "dit"),
    Family("auraflow", "ldm", (("has", "double_layers.0.attn.w1q.weight"),), None,
           "ComfyUI comfy/model_detection.py (AuraFlow: double_layers.0.attn.w1q)", "dit"),
    Family("hunyuan-dit", "ldm", (("has", "mlp_t5.0.weight"),), None,
           "ComfyUI comfy/model_detection.py (HunyuanDiT: mlp_t5.0.weight)", "dit"),
    Family("lumina2", "ldm", (("has", "cap_embedder.1.weight"), ("has", "noise_refiner.0.attention.k_norm.weight")), None,
           "ComfyUI comfy/model_detection.py (Lumina2 / Z-Image: cap_embedder + noise_refiner)", "dit"),
    Family("qwen-image", "ldm", (("dim", "txt_norm.weight", 0, 3584),), None,
           "ComfyUI comfy/model_detection.py (QwenImage: txt_norm 3584)", "dit"),
    Family("pixart", "ldm", (("has", "t_block.1.weight"),), ("x_embedder.proj.weight", 1),
           "ComfyUI comfy/model_detection.py (PixArt: t_block.1.weight)", "dit"),
    Family("stable-cascade", "ldm", (("has", "clf.1.weight"),), None,
           "ComfyUI comfy/model_detection.py (Stable Cascade: clf.1.weight)", "dit"),
)

_MID = "middle_block.1.transformer_blocks.0.attn1.to_q.weight"

VARIANTS: Tuple[Variant, ...] = (
    # SD1.x: in_channels tells the variant (4 txt2img, 9 inpainting, 8 instruct-pix2pix)
    Variant("sd1", (("feature", "in_channels", 9),), "stable-diffusion-v1-inpainting", "inpainting",
            "ModelSpec architecture list; runwayml sd-v1-5-inpainting (in_channels 9: 4 latent + 4 masked latent + 1 mask)"),
    Variant("sd1", (("feature", "in_channels", 8),), "stable-diffusion-v1-instruct-pix2pix", "instruct-pix2pix",
            "timbrooks instruct-pix2pix train.yaml (in_channels 8); ComfyUI supported_models.py SD15_instructpix2pix"),
    Variant("sd1", (), "stable-diffusion-v1", None, "ModelSpec architecture list; CompVis v1-inference.yaml"),
    # SD2.x: 512 and 768-v have identical shapes; the prediction type decides (see identify/prediction.py)
    Variant("sd2", (("feature", "in_channels", 9),), "stable-diffusion-v2-inpainting", "inpainting",
            "Stability AI stable-diffusion-2-inpainting (v2-inpainting-inference.yaml, in_channels 9)"),
    Variant("sd2", (("feature", "in_channels", 5),), "stable-diffusion-v2-depth", "depth",
            "Stability AI stable-diffusion-2-depth (v2-midas-inference.yaml, in_channels 5)"),
    Variant("sd2", (), "stable-diffusion-v2", None, "SD2 family; 512 vs 768-v decided by prediction type"),
    Variant("sd2-unclip", (("dim", "label_emb.0.0.weight", 1, 1536),), "stable-diffusion-v2-unclip-l", "unclip",
            "Stability AI stable-diffusion-2-1-unclip sd21-unclip-l (adm 1536: CLIP ViT-L image embedding + noise level)"),
    Variant("sd2-unclip", (), "stable-diffusion-v2-unclip-h", "unclip",
            "Stability AI stable-diffusion-2-1-unclip sd21-unclip-h (adm 2048)"),
    Variant("sd-x4-upscaler", (), "stable-diffusion-x4-upscaler", "x4-upscaler",
            "Stability AI stable-diffusion-x4-upscaler (x4-upscaling.yaml)"),
    # SDXL family: distilled variants have fewer transformer blocks (ComfyUI supported_models.py)
    Variant("sdxl", (("lacks", _MID), ("depth", "input_blocks.7.1.transformer_blocks.", 4)), "ssd-1b", "distilled",
            "ComfyUI supported_models.py SSD1B (transformer_depth [0,0,2,2,4,4], no middle transformer)"),
    Variant("sdxl", (("lacks", _MID), ("depth", "input_blocks.7.1.transformer_blocks.", 2)), "segmind-vega", "distilled",
            "ComfyUI supported_models.py Segmind_Vega (transformer_depth [0,0,1,1,2,2], no middle transformer)"),
    Variant("sdxl", (("feature", "in_channels", 9),), "stable-diffusion-xl-v1-inpainting", "inpainting",
            "diffusers stable-diffusion-xl-1.0-inpainting-0.1 (in_channels 9)"),
    Variant("sdxl", (("feature", "in_channels", 8),), "stable-diffusion-xl-v1-instruct-pix2pix", "instruct-pix2pix",
            "diffusers sdxl-instructpix2pix-768 (in_channels 8)"),
    Variant("sdxl", (), "stable-diffusion-xl-v1-base", None, "ModelSpec architecture list; sgm sd_xl_base.yaml"),
    Variant("sdxl-refiner", (), "stable-diffusion-xl-v1-refiner", "refiner", "ModelSpec architecture list; sgm sd_xl_refiner.yaml"),
    # SD3 / SD3.5 (MMDiT): depth = x_embedder width / 64 (ComfyUI model_detection.py)
    Variant("sd3", (("has", "joint_blocks.0.x_block.attn2.qkv.weight"),), "stable-diffusion-v3.5-medium", None,
            "ComfyUI model_detection.py (x_block.attn2 = MMDiT-X, SD3.5 Medium)"),
    Variant("sd3", (("dim_div", "x_embedder.proj.weight", 0, 64, 38),), "stable-diffusion-v3.5-large", None,
            "ComfyUI model_detection.py (depth 38 = SD3.5 Large / Large Turbo)"),
    Variant("sd3", (("dim_div", "x_embedder.proj.weight", 0, 64, 24),), "stable-diffusion-v3-medium", None,
            "ModelSpec architecture list; ComfyUI model_detection.py (depth 24)"),
    Variant("sd3", (), "stable-diffusion-v3", None, "MMDiT of an unlisted depth"),
    # FLUX.1: guidance embedder = dev (guidance-distilled), absent = schnell; img_in width = variant
    Variant("flux1", (("feature", "in_channels", 384),), "flux-1-fill-dev", "inpainting",
            "BFL FLUX.1-Fill-dev (img_in 384 = 64 latent + 320 mask/image channels); ComfyUI model_detection.py"),
    Variant("flux1", (("feature", "in_channels", 128),), "flux-1-depth-dev", "depth",
            "BFL FLUX.1-Depth-dev / FLUX.1-Canny-dev (img_in 128; Canny has the same shapes)", ("flux_depth_or_canny",)),
    Variant("flux1", (("has", "guidance_in.in_layer.weight"),), "flux-1-dev", None, "ModelSpec architecture list; BFL flux util.py configs"),
    Variant("flux1", (("has", "time_text_embed.guidance_embedder.linear_1.weight"),), "flux-1-dev", None, "diffusers FluxTransformer2DModel (guidance_embeds=True)"),
    Variant("flux1", (), "flux-1-schnell", None, "ModelSpec architecture list; BFL flux util.py configs (no guidance_in)"),
    Variant("flux2", (), "flux-2", None, "BFL FLUX.2 (ComfyUI model_detection.py Flux2)"),
    Variant("chroma", (), "chroma", None, "lodestones Chroma (ComfyUI model_detection.py)"),
    Variant("auraflow", (), "auraflow", None, "fal AuraFlow (ComfyUI model_detection.py)"),
    Variant("hunyuan-dit", (), "hunyuan-dit", None, "Tencent HunyuanDiT (ComfyUI model_detection.py)"),
    Variant("lumina2", (("dim", "cap_embedder.1.weight", 0, 3840),), "z-image", None, "Tongyi Z-Image (ComfyUI model_detection.py: cap_embedder 3840)"),
    Variant("lumina2", (("dim", "cap_embedder.1.weight", 0, 2304),), "lumina-2", None, "Alpha-VLLM Lumina-Image-2.0 (ComfyUI model_detection.py: cap_embedder 2304)"),
    Variant("lumina2", (), "lumina-2", None, "Lumina-2 family, unlisted width"),
    Variant("qwen-image", (), "qwen-image", None, "Qwen-Image (ComfyUI model_detection.py)"),
    Variant("pixart", (("has", "ar_embedder.mlp.0.weight"),), "pixart-alpha", None, "PixArt-alpha (ComfyUI model_detection.py: ar_embedder)"),
    Variant("pixart", (), "pixart-sigma", None, "PixArt-Sigma (ComfyUI model_detection.py)"),
    Variant("stable-cascade", (("has", "clip_txt_mapper.weight"),), "stable-cascade-stage-c", None, "Stability AI Stable Cascade stage C (clip_txt_mapper)"),
    Variant("stable-cascade", (), "stable-cascade-stage-b", None, "Stability AI Stable Cascade stage B"),
)
