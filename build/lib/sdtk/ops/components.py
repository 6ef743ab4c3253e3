"""Where each component of a single-file checkpoint lives (key prefixes), as plain tables.

A minimal local table for `sdtk convert` until `sdtk.architectures` (the identify work) is
available; `component_prefixes_in` and `component_of` are the only two entry points, so switching
to the shared tables is one change here. Source of every row: shared reference
"architectures.md" (ComfyUI `model_detection.py`/`supported_models.py`, A1111 `sd_models.py`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

# (component, prefix). Longest prefix wins when several match.
COMPONENT_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("unet", "model.diffusion_model."),  # LDM/sgm checkpoints (SD1/SD2/SDXL/SD3/FLUX in ComfyUI layout)
    ("vae", "first_stage_model."),  # LDM/sgm checkpoints; also ComfyUI's SD3 all-in-one
    ("vae", "vae."),  # ComfyUI FLUX all-in-one checkpoints (supported_models.Flux vae_key_prefix)
    ("clip-l", "cond_stage_model.transformer."),  # SD1 CLIP-L (HF layout; NovelAI files lack text_model.)
    ("open-clip-h", "cond_stage_model.model."),  # SD2 OpenCLIP-H (LDM layout)
    ("clip-l", "conditioner.embedders.0.transformer."),  # SDXL base CLIP-L
    ("clip-g", "conditioner.embedders.1.model."),  # SDXL base CLIP-G (OpenCLIP layout)
    ("clip-g", "conditioner.embedders.0.model."),  # SDXL refiner: CLIP-G only
    ("clip-l", "text_encoders.clip_l.transformer."),  # SD3/FLUX all-in-one (ComfyUI)
    ("clip-g", "text_encoders.clip_g.transformer."),  # SD3 all-in-one (ComfyUI)
    ("t5xxl", "text_encoders.t5xxl.transformer."),  # SD3/FLUX all-in-one (ComfyUI)
    ("ema", "model_ema."),  # SD1/SD2 training checkpoints (LitEma, dots removed)
    ("model-sampling", "model.model_sampling."),  # ComfyUI-saved SD3 files (sigmas buffer)
)

TEXT_ENCODERS = ("clip-l", "clip-g", "open-clip-h", "t5xxl")

# Bare keys a checkpoint may hold beside its components.
SCHEDULE_BUFFERS = frozenset({  # ldm DDPM.register_schedule (SD1/SD2 checkpoints), 1000 values each
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
})
MARKERS = frozenset({  # prediction-type markers read by ComfyUI (model_detection) and Forge
    "v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min", "edm_mean", "edm_std",
})
# Training leftovers no inference program loads (architectures.md "training junk").
JUNK_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("embedding_manager.", "textual-inversion training state"),  # ldm textual_inversion fork
    ("lora_te_", "LoRA training leftover"),  # kohya sd-scripts
    ("lora_unet_", "LoRA training leftover"),  # kohya sd-scripts
    ("control_model.", "ControlNet training leftover"),  # ControlNet training repo
    ("optimizer", "optimizer state"),  # Lightning checkpoints
    ("loss.", "training loss network (discriminator/LPIPS)"),  # ldm autoencoder training files
    ("model_ema.", "EMA copy of the UNet"),
)


def component_of(key: str) -> Optional[str]:
    """The component a key belongs to ("unet", "vae", "clip-l", ...), or None."""
    best: Optional[Tuple[int, str]] = None
    for component, prefix in COMPONENT_PREFIXES:
        if key.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), component)
    return best[1] if best else None


def component_prefixes_in(keys: Iterable[str]) -> Dict[str, List[str]]:
    """{component: [prefixes present in `keys`]} (a component may use two, e.g. old and new CLIP)."""
    found: Dict[str, List[str]] = {}
    for key in keys:
        component = component_of(key)
        if component is None:
            continue
        prefix = max((p for c, p in COMPONENT_PREFIXES if c == component and key.startswith(p)), key=len)
        found.setdefault(component, [])
        if prefix not in found[component]:
            found[component].append(prefix)
    return found


def is_marker(key: str) -> bool:
    return key in MARKERS


def is_known(key: str) -> bool:
    """A key the tables know (a component, schedule buffer or marker)."""
    return component_of(key) is not None or key in SCHEDULE_BUFFERS or key in MARKERS


def junk_reason(key: str) -> Optional[str]:
    for prefix, reason in JUNK_PREFIXES:
        if key.startswith(prefix):
            return reason
    return None
