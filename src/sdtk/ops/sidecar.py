"""The `<model>.yaml` config A1111 needs beside models it cannot configure from the weights.

A1111 (modules/sd_models_config.py) takes a yaml named like the model first. Without one it
picks a config from the state dict: SD 1.x and SDXL are always epsilon (A1111 1.10 does not read
the `v_pred` marker that Forge and ComfyUI read), SD 2.x is guessed by running the UNet once
(`is_using_v_parameterization_for_sd2`). So convert writes, unless --no-sidecar:
- the input's own `<model>.yaml` when it agrees with what is known of the output (it may carry
  the author's settings);
- else the packaged config for a v-prediction SD1, SD2 or SDXL output whose type is certain.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

# (family, prediction type) -> packaged config in sdtk/data/configs (each file names its source).
CONFIGS = {
    ("sd1", "v"): "v1-inference-v.yaml",
    ("sd2", "v"): "v2-inference-v.yaml",
    ("sdxl", "v"): "sd_xl_v.yaml",
}


@dataclass
class SidecarDecision:
    config: Optional[str]  # packaged config file name, or None
    reason: str
    text: Optional[str] = None  # the yaml to write (input's own or packaged); None: nothing


def sidecar_for(facts, input_config=None) -> SidecarDecision:
    """What yaml to write beside a converted model (facts: sdtk.identify.facts.ModelFacts of the
    output; input_config: the input's ConfigBeside, or None)."""
    family, prediction = facts.family, (facts.prediction_type if facts.certain else None)
    if facts.kind not in ("checkpoint", "diffusion-model"):
        return SidecarDecision(None, "not needed")
    if input_config is not None and input_config.usable and input_config.prediction == prediction \
            and prediction is not None and input_config.family in (None, family):
        name = Path(input_config.path).name
        return SidecarDecision(None, f"copied {name} (the input's config, which agrees with the output)", input_config.text)
    config = CONFIGS.get((family, prediction))
    if config:
        ztsnr = ("; A1111 also needs Settings > Sampler parameters > Noise schedule: Zero Terminal SNR"
                 if facts.zero_terminal_snr else "")
        why = ("A1111 1.10 does not read the v_pred marker" if family == "sdxl" else
               "A1111 loads SD 1.x files as epsilon without it" if family == "sd1" else
               "A1111 otherwise guesses SD 2.x by running the UNet once")
        return SidecarDecision(config, f"{config}: {why}{ztsnr}", config_text(config))
    if prediction is None and family == "sd2":
        return SidecarDecision(None, "not written: the prediction type of this SD2 model is unknown; if it is a "
                                     "768-v model, convert with --prediction-type v (or auto: ComfyUI's value check) "
                                     "to get the .yaml A1111 needs")
    return SidecarDecision(None, "not needed")


def config_text(config: str) -> str:
    return resources.files("sdtk.data").joinpath("configs", config).read_text(encoding="utf-8")


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(".yaml")
