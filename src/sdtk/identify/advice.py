"""What to do: plain-language advice chosen from the identity (texts live in the report's
message catalogues, keys `advice.<code>`). Source of the advice itself: the seeds' guides, see
the architectures reference "What the seeds tell users to pick"."""
from __future__ import annotations

from sdtk.identify.model import Advice, Identity

# Header bytes per tensor in a safetensors file (architectures reference: ~150-200 bytes per key).
HEADER_BYTES_PER_KEY = 160
GENERATION_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "markers")
# Families whose ComfyUI model class reads the prediction markers (`v_pred`, `ztsnr`, `edm_vpred.*`)
# and samples accordingly with no setting: ComfyUI comfy/supported_models.py, SDXL.model_type (its
# subclasses too). SD15 has no model_type (always EPS); SD20 uses a value statistic, not the markers.
COMFYUI_READS_MARKERS = ("sdxl",)


def _add(ident: Identity, code: str, **details) -> None:
    ident.advice.append(Advice(code, f"advice.{code}", details))


def generation_size(ident: Identity) -> int:
    """Bytes of the `--for generation` output: one weight set in fp16, no training state."""
    params = sum(c.parameters for n, c in ident.components.items() if n in GENERATION_COMPONENTS)
    keys = sum(len(c.keys) for n, c in ident.components.items() if n in GENERATION_COMPONENTS)
    return params * 2 + keys * HEADER_BYTES_PER_KEY


def choose_advice(ident: Identity) -> None:
    kind = ident.kind
    codes = {p.code for p in ident.problems}
    if "clip_position_ids_float" in codes or "clip_position_ids_shifted" in codes or "clip_old_key_names" in codes:
        _add(ident, "fix_clip")
    if "non_finite_values" in codes:
        _add(ident, "non_finite")
    if kind in ("checkpoint", "diffusion-model"):
        heavy = ident.has_ema or ident.precision.startswith(("fp32", "mixed")) or ident.training_state or "training_leftovers" in codes
        heavy = heavy and ident.quantization is None  # a GGUF's F32 norms are by design
        if ident.has_ema:
            _add(ident, "training_checkpoint", precision=ident.precision, size=ident.file_size, target_size=generation_size(ident))
        elif heavy:
            _add(ident, "shrink_for_generation", precision=ident.precision, size=ident.file_size, target_size=generation_size(ident))
        if ident.format not in ("safetensors", "gguf"):
            _add(ident, "convert_to_safetensors")
        if kind == "diffusion-model":
            _add(ident, "diffusion_model_only", network=ident.family)
        elif ident.partial:
            _add(ident, "partial_checkpoint", missing=ident.missing_components)
        if "needs_config_yaml" in codes:
            need = ident.problem("needs_config_yaml").details
            _add(ident, "needs_config_yaml", prediction=need.get("prediction"), config=need.get("config"),
                 why_key=f"why.advice_config.{need.get('family')}")
        if ident.prediction_type == "v":
            if ident.prediction_source == "marker" and ident.family in COMFYUI_READS_MARKERS:
                _add(ident, "vpred_marked", ztsnr=ident.zero_terminal_snr)
            else:
                _add(ident, "vpred_settings", ztsnr=ident.zero_terminal_snr)
        if "markers" in ident.components:
            _add(ident, "keep_markers")
        if "sdxl_vae_fp16" in codes:
            _add(ident, "sdxl_vae_fp16")
        fp8_parts = [n for n, c in ident.components.items() if (n == "vae" or n.startswith("text_encoder"))
                     and any(d.startswith("fp8") for d in c.dtypes)]
        if fp8_parts:
            _add(ident, "fp8_vae_or_text_encoder", components=fp8_parts)
        if not ident.partial and not heavy and not fp8_parts and ident.format == "safetensors" and not (codes & {"clip_position_ids_float", "clip_position_ids_shifted", "non_finite_values", "missing_keys"}):
            # where it goes (ecosystem reference, folder layouts): a checkpoint in A1111/Forge
            # models/Stable-diffusion or ComfyUI models/checkpoints; a diffusion model alone
            # (FLUX transformer, bare UNet) in ComfyUI models/diffusion_models or Forge's
            # models/Stable-diffusion with separate VAE/text encoders; A1111 cannot load it
            if (ident.quantization or {}).get("format") == "bitsandbytes-4bit":
                # Forge alone loads bitsandbytes 4-bit files (reference quantized-formats.md §4.3)
                _add(ident, "ready_for_generation_forge_nf4", precision=ident.precision)
            else:
                _add(ident, "ready_for_generation" if kind == "checkpoint" else "ready_for_generation_diffusion_model",
                     precision=ident.precision, folder="checkpoints" if kind == "checkpoint" else "diffusion_models")
        if ident.variant in ("inpainting", "instruct-pix2pix", "depth", "x4-upscaler", "unclip", "refiner"):
            _add(ident, f"variant_{ident.variant.replace('-', '_')}")
    elif kind in ("lora", "embedding", "controlnet", "t2i-adapter"):
        code = "controlnet" if kind == "t2i-adapter" else kind
        base = (ident.adapter or {}).get("base_architecture")
        if base:
            _add(ident, code, base=base)
        else:
            _add(ident, f"{code}_unknown_base")
    elif kind == "hypernetwork":
        _add(ident, "hypernetwork")
    elif kind == "vae":
        _add(ident, "vae", channels=16 if ident.architecture == "vae-kl-f8-16ch" else 4)
    elif kind == "text-encoder":
        _add(ident, "text_encoder", model=ident.architecture)
    elif kind == "unknown":
        _add(ident, "unknown")
    if kind == "embedding" and ident.format != "safetensors":
        _add(ident, "convert_embedding")  # the layout A1111 and ComfyUI load from safetensors (ops/embedding.py)
    elif kind in ("lora", "embedding", "hypernetwork", "controlnet", "t2i-adapter", "vae", "text-encoder") and ident.format != "safetensors":
        _add(ident, "convert_to_safetensors")
