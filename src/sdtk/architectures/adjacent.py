"""Files that are not a diffusion model: LoRAs, embeddings, hypernetworks, ControlNets,
adapters, stand-alone VAEs and text encoders. First match wins; each row is tried with each
of its prefixes stripped (stand-alone files are bare; some are saved with a checkpoint prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from sdtk.architectures.match import Condition


@dataclass(frozen=True)
class Adjacent:
    kind: str  # Identity.kind
    subtype: str  # format / algorithm / model name
    architecture: Optional[str]  # fixed id, or None when the analyser decides (LoRA base, ...)
    conditions: Tuple[Condition, ...]
    prefixes: Tuple[str, ...]
    source: str


_BARE = ("",)
_HINT = ("input_hint_block.0.weight",)

ADJACENT: Tuple[Adjacent, ...] = (
    # ---- LoRA and LyCORIS (kohya naming: lora_unet_<module>, lora_te[12]_<module>) ------------
    Adjacent("lora", "lokr", None, (("any", (("any_suffix", ".lokr_w1"), ("any_suffix", ".lokr_w1_a"))),), _BARE,
             "KohakuBlueleaf/LyCORIS lycoris/modules/lokr.py (lokr_w1 / lokr_w1_a/_b, lokr_w2...)"),
    Adjacent("lora", "loha", None, (("any_suffix", ".hada_w1_a"),), _BARE,
             "KohakuBlueleaf/LyCORIS lycoris/modules/loha.py (hada_w1_a/_b, hada_w2_a/_b, hada_t1/_t2)"),
    Adjacent("lora", "kohya", None, (("any_suffix", ".lora_down.weight"),), _BARE,
             "kohya-ss/sd-scripts networks/lora.py (lora_down/lora_up/alpha; LoCon when conv layers are adapted)"),
    Adjacent("lora", "peft", None, (("any_suffix", ".lora_A.weight"),), _BARE,
             "huggingface/peft tuners/lora (lora_A/lora_B); diffusers loaders/lora_pipeline.py"),
    Adjacent("lora", "diffusers-old", None, (("any", (("any_suffix", ".lora.down.weight"), ("any_suffix", "_lora.down.weight"),
                                                    ("any_suffix", ".lora_linear_layer.down.weight"))),), _BARE,
             "diffusers loaders (attn processors to_q_lora.down, lora_linear_layer.up; pre-PEFT format)"),
    Adjacent("lora", "peft", None, (("any", (("any_suffix", ".lora_A.default.weight"), ("any_suffix", ".lora_A"))),), _BARE,
             "huggingface/peft adapter-named keys (lora_A.default.weight); Mochi LoRAs (lora_A without .weight), ComfyUI LoRAAdapter.load"),
    Adjacent("lora", "oft", None, (("any", (("any_suffix", ".oft_blocks"), ("any_suffix", ".oft_diag"))),), _BARE,
             "kohya-ss/sd-scripts networks/oft.py (oft_blocks); LyCORIS diag-oft / BOFT (oft_blocks, old oft_diag)"),
    Adjacent("lora", "ia3", None, (("any_suffix", ".on_input"),), _BARE,
             "KohakuBlueleaf/LyCORIS lycoris/modules/ia3.py ((IA)^3: weight + on_input)"),
    Adjacent("lora", "glora", None, (("any_suffix", ".a2.weight"), ("any_suffix", ".b2.weight")), _BARE,
             "KohakuBlueleaf/LyCORIS lycoris/modules/glora.py (a1/a2/b1/b2)"),
    Adjacent("lora", "full", None, (("any_suffix", ".diff"), ("any_prefix", "lora_")), _BARE,
             "KohakuBlueleaf/LyCORIS lycoris/modules/full.py and extract_locon.py full mode (diff, diff_b)"),
    # ---- Textual inversion ---------------------------------------------------------------------
    Adjacent("embedding", "a1111", None, (("any_prefix", "string_to_param."),), _BARE,
             "A1111 modules/textual_inversion/textual_inversion.py (string_to_param, string_to_token, name, step)"),
    Adjacent("embedding", "sdxl", "stable-diffusion-xl-v1-base/textual-inversion", (("has", "clip_l"), ("has", "clip_g")), _BARE,
             "A1111 textual_inversion.py (SDXL embeddings: clip_l [n,768] + clip_g [n,1280])"),
    Adjacent("embedding", "kohya", None, (("has", "emb_params"),), _BARE,
             "kohya-ss/sd-scripts train_textual_inversion.py (emb_params)"),
    Adjacent("embedding", "diffusers", None, (("sole", (768, 1024, 1280)),), _BARE,
             "diffusers examples/textual_inversion (learned_embeds.bin: {placeholder token: [768]}); A1111 textual_inversion.py "
             "create_embedding_from_data 'diffuser concepts'"),
    # ---- Hypernetworks (A1111): int keys = attention widths -------------------------------------
    Adjacent("hypernetwork", "a1111", None, (("any", (("any_prefix", "768."), ("any_prefix", "1024."), ("any_prefix", "320."),
                                                       ("any_prefix", "640."), ("any_prefix", "1280."))),
                                              ("any_suffix", ".linear.0.weight")), _BARE,
             "A1111 modules/hypernetworks/hypernetwork.py (dict keyed by 320/640/768/1024/1280)"),
    # ---- ControlNet / T2I-Adapter ----------------------------------------------------------------
    Adjacent("controlnet", "ldm", None, (("has", "zero_convs.0.0.weight"), ("has", "input_hint_block.0.weight")), ("control_model.", ""),
             "lllyasviel/ControlNet cldm/cldm.py (zero_convs, input_hint_block); A1111 sd-webui-controlnet"),
    Adjacent("controlnet", "diffusers", None, (("has", "controlnet_cond_embedding.conv_in.weight"),), ("controlnet.", ""),
             "diffusers ControlNetModel (controlnet_cond_embedding)"),
    Adjacent("t2i-adapter", "tencent", None, (("any", (("has", "body.0.resnets.0.block1.weight"), ("has", "body.0.in_conv.weight"),
                                                        ("has", "body.0.block1.weight"))),), ("adapter.", ""),
             "TencentARC T2I-Adapter ldm/modules/encoders/adapter.py; diffusers T2IAdapter"),
    Adjacent("t2i-adapter", "tencent", None, (("has", "conv_in.weight"), ("any_prefix", "body.")), ("adapter.", ""),
             "TencentARC T2I-Adapter (Adapter_light / StyleAdapter: conv_in + body)"),
    # ---- Stand-alone VAEs: latent channels = decoder.conv_in in-channels --------------------------
    Adjacent("vae", "ldm", "sd-vae-kl-f8", (("dim", "decoder.conv_in.weight", 1, 4), ("has", "decoder.up.0.block.0.conv1.weight")),
             ("", "first_stage_model.", "vae."),
             "CompVis ldm AutoencoderKL (kl-f8, z_channels 4): SD1/SD2/SDXL VAEs share these shapes"),
    Adjacent("vae", "ldm", "vae-kl-f8-16ch", (("dim", "decoder.conv_in.weight", 1, 16),), ("", "first_stage_model.", "vae."),
             "SD3 / FLUX.1 AutoencoderKL (z_channels 16); ComfyUI comfy/sd.py VAE detection"),
    Adjacent("vae", "diffusers", "sd-vae-kl-f8", (("dim", "decoder.conv_in.weight", 1, 4), ("has", "decoder.up_blocks.0.resnets.0.conv1.weight")),
             ("", "vae."), "diffusers AutoencoderKL (latent_channels 4)"),
    Adjacent("vae", "diffusers", "vae-kl-f8-16ch", (("dim", "decoder.conv_in.weight", 1, 16), ("has", "decoder.up_blocks.0.resnets.0.conv1.weight")),
             ("", "vae."), "diffusers AutoencoderKL (latent_channels 16)"),
    # ---- Stand-alone text encoders ---------------------------------------------------------------
    Adjacent("text-encoder", "clip-g", "clip-g", (("dim", "text_model.encoder.layers.0.self_attn.q_proj.weight", 0, 1280),),
             ("", "transformer.", "text_encoders.clip_g.transformer.", "conditioner.embedders.1.transformer."),
             "OpenCLIP ViT-bigG-14 in HF CLIPTextModelWithProjection layout (hidden 1280, 32 layers)"),
    Adjacent("text-encoder", "clip-h", "clip-h", (("dim", "text_model.encoder.layers.0.self_attn.q_proj.weight", 0, 1024),),
             ("", "transformer."), "OpenCLIP ViT-H-14 in HF layout (hidden 1024, 24 layers)"),
    Adjacent("text-encoder", "clip-l", "clip-l", (("dim", "text_model.encoder.layers.0.self_attn.q_proj.weight", 0, 768),),
             ("", "transformer.", "cond_stage_model.transformer.", "text_encoders.clip_l.transformer.", "conditioner.embedders.0.transformer."),
             "OpenAI CLIP ViT-L/14 in HF CLIPTextModel layout (hidden 768, 12 layers)"),
    Adjacent("text-encoder", "clip-g", "clip-g", (("dim", "transformer.resblocks.0.attn.in_proj_weight", 1, 1280),),
             ("", "model.", "conditioner.embedders.1.model."), "OpenCLIP ViT-bigG-14, OpenCLIP layout (resblocks)"),
    Adjacent("text-encoder", "clip-h", "clip-h", (("dim", "transformer.resblocks.0.attn.in_proj_weight", 1, 1024),),
             ("", "model.", "cond_stage_model.model."), "OpenCLIP ViT-H-14, OpenCLIP layout (resblocks)"),
    Adjacent("text-encoder", "t5-xxl", "t5-xxl", (("dim", "encoder.block.0.layer.1.DenseReluDense.wi_1.weight", 0, 10240),),
             ("", "transformer.", "text_encoders.t5xxl.transformer."),
             "google t5-v1_1-xxl encoder (d_ff 10240), as used by SD3 and FLUX.1"),
    Adjacent("text-encoder", "t5", "t5", (("has", "encoder.block.0.layer.0.SelfAttention.q.weight"),),
             ("", "transformer."), "T5 encoder of another size"),
)

# Text-encoder widths: what an embedding vector size or a LoRA's text-encoder width says about
# the base model. Source: CLIP ViT-L/14 (768, SD1), OpenCLIP ViT-H (1024, SD2), ViT-bigG (1280, SDXL's 2nd).
EMBEDDING_WIDTH_BASE = {768: "stable-diffusion-v1", 1024: "stable-diffusion-v2", 1280: "stable-diffusion-xl-v1-base"}

# Cross-attention context width of a UNet (LoRA / ControlNet base model). Source: Forge's shortcut
# (input_blocks.4.1...attn2.to_k shape[1]): 768 sd1, 1024 sd2, 1280 refiner, 2048 sdxl.
CONTEXT_WIDTH_BASE = {768: "stable-diffusion-v1", 1024: "stable-diffusion-v2", 1280: "stable-diffusion-xl-v1-refiner",
                      2048: "stable-diffusion-xl-v1-base", 4096: "flux-1-dev"}

# kohya `ss_base_model_version` values -> architecture id. Source: kohya-ss/sd-scripts
# library/train_util.py (sd_v1, sd_v2, sd_v2_v? (v_parameterization), sdxl_base_v1-0, flux1, sd3).
KOHYA_BASE = {
    "sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512", "sd_v2_v": "stable-diffusion-v2-768-v",
    "sd_v2_768_v": "stable-diffusion-v2-768-v", "sdxl_base_v0-9": "stable-diffusion-xl-v1-base",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base", "flux1": "flux-1-dev", "sd3": "stable-diffusion-v3-medium",
}

# LoRA module names that reveal the base family (kohya naming). Source: kohya-ss/sd-scripts
# networks/lora.py (lora_unet_input_blocks_* sgm naming for SDXL, lora_unet_down_blocks_* for SD1/2),
# networks/lora_flux.py (lora_unet_double_blocks_*), networks/lora_sd3.py (lora_unet_joint_blocks_*).
LORA_MODULE_HINTS = (
    ("lora_unet_double_blocks_", "flux-1-dev"),
    ("lora_unet_single_blocks_", "flux-1-dev"),
    ("lora_unet_joint_blocks_", "stable-diffusion-v3-medium"),
    ("lora_te1_", "stable-diffusion-xl-v1-base"),
    ("lora_te2_", "stable-diffusion-xl-v1-base"),
    ("lora_unet_input_blocks_", "stable-diffusion-xl-v1-base"),
    ("transformer.single_transformer_blocks.", "flux-1-dev"),
    ("transformer.transformer_blocks.", "flux-1-dev"),
    ("unet.down_blocks.", None),  # width decides (see CONTEXT_WIDTH_BASE)
)
