"""The `<model>.yaml` config A1111 needs beside models it cannot configure from the weights.

A1111 (modules/sd_models_config.py) picks a config from the state dict; v-prediction is only
guessed for SD2 (by running the UNet once) and was not detected at all before v1.6, so SD2 768-v
models ship with `v2-inference-v.yaml` renamed to the model's name. SDXL v-pred models are
recognised by their `v_pred` marker tensor (kept by convert), so they need no yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

# (ModelSpec architecture, prediction type) -> packaged config (source: Stability-AI/stablediffusion
# configs/stable-diffusion/, MIT; written out in sdtk/data/configs).
CONFIGS = {
    ("stable-diffusion-v2-768-v", "v"): "v2-inference-v.yaml",
    ("stable-diffusion-v2-512", "v"): "v2-inference-v.yaml",
}


@dataclass
class SidecarDecision:
    config: Optional[str]  # packaged config file name, or None
    reason: str


def sidecar_for(architecture: Optional[str], prediction_type: Optional[str], has_v_marker: bool) -> SidecarDecision:
    config = CONFIGS.get((architecture, prediction_type))
    if config:
        return SidecarDecision(config, f"A1111 needs {config} beside a {architecture} model with {prediction_type}-prediction")
    if prediction_type == "v" and has_v_marker:
        return SidecarDecision(None, "not needed: the v_pred marker tensor tells A1111, Forge and ComfyUI")
    if prediction_type == "v":
        return SidecarDecision(None, f"no A1111 config is known for v-prediction {architecture or 'models of this kind'}; none written")
    if prediction_type is None and (architecture or "").startswith("stable-diffusion-v2"):
        return SidecarDecision(None, "not written: the prediction type of this SD2 model is unknown; if it is a "
                                     "768-v model, convert with --prediction-type v to get the .yaml A1111 needs")
    return SidecarDecision(None, "not needed")


def config_text(config: str) -> str:
    return resources.files("sdtk.data").joinpath("configs", config).read_text(encoding="utf-8")


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(".yaml")
