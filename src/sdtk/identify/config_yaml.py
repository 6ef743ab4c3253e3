"""The `<model>.yaml` config beside a model file: what A1111 reads before anything else
(modules/sd_models_config.py `find_checkpoint_config_near_filename`: a yaml named like the model
wins over every guess from the weights). Read once here for inspect, convert and the library.

What a config says, from its own keys (Stability-AI/stablediffusion configs, CompVis ldm
`LatentDiffusion(parameterization="eps")` default; Stability-AI/generative-models sgm denoiser
`VScaling` / `EpsScaling` / `EDMScaling`; A1111 configs/sd_xl_v.yaml):
- `parameterization: "v"` (ldm) or a `...VScaling` denoiser (sgm): v-prediction;
- an ldm `LatentDiffusion` config without `parameterization`, or an `EpsScaling` denoiser: epsilon;
- `context_dim` of the UNet: 768 SD1, 1024 SD2, 2048 SDXL base, 1280 SDXL refiner.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

MAX_CONFIG_BYTES = 1 << 20  # a model config is a few kB; more is not a config
# UNet cross-attention width -> family (architectures reference; the configs' context_dim)
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}


@dataclass
class ConfigBeside:
    path: str
    exists: bool
    text: Optional[str] = None
    error: Optional[str] = None  # why it could not be used (unreadable, not YAML, not a model config)
    prediction: Optional[str] = None  # "v", "epsilon", "edm" or None (the config does not say)
    context_dim: Optional[int] = None
    details: List[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.exists and self.error is None

    @property
    def family(self) -> Optional[str]:
        return CONTEXT_FAMILY.get(self.context_dim) if self.context_dim else None


def config_path_for(model_path: "os.PathLike[str] | str") -> str:
    return os.path.splitext(os.fspath(model_path))[0] + ".yaml"


def read_config_beside(model_path: "os.PathLike[str] | str") -> ConfigBeside:
    """The `<model>.yaml` beside `model_path`, read and parsed (never raises)."""
    path = config_path_for(model_path)
    if not os.path.isfile(path):
        return ConfigBeside(path, exists=os.path.lexists(path), error="not a regular file" if os.path.lexists(path) else None)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        return ConfigBeside(path, True, error=f"cannot be read ({e.strerror or e})")
    if len(raw) > MAX_CONFIG_BYTES:
        return ConfigBeside(path, True, error="is larger than 1 MiB; not a model config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ConfigBeside(path, True, error="is not UTF-8 text")
    return parse_config(path, text)


def parse_config(path: str, text: str) -> ConfigBeside:
    import yaml

    conf = ConfigBeside(path, True, text=text)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        conf.error = f"is not valid YAML{where}"
        return conf
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        conf.error = "is not a model config (no model: section)"
        return conf
    params = model.get("params") if isinstance(model.get("params"), dict) else {}
    target = model.get("target") if isinstance(model.get("target"), str) else ""
    param = params.get("parameterization")
    targets = list(_targets(model))
    if isinstance(param, str):
        conf.prediction = {"v": "v", "eps": "epsilon", "epsilon": "epsilon", "x0": "x0"}.get(param.strip().lower())
        conf.details.append(f"parameterization: {param}")
    elif any(t.endswith("VScaling") for t in targets):
        conf.prediction = "v"
        conf.details.append("denoiser VScaling")
    elif any(t.endswith("EDMScaling") for t in targets):
        conf.prediction = "edm"
        conf.details.append("denoiser EDMScaling")
    elif any(t.endswith("EpsScaling") for t in targets):
        conf.prediction = "epsilon"
        conf.details.append("denoiser EpsScaling")
    elif target.endswith(("LatentDiffusion", "DDPM", "LatentInpaintDiffusion", "LatentDepth2ImageDiffusion")):
        conf.prediction = "epsilon"  # ldm's default parameterization is "eps"
        conf.details.append("ldm config without parameterization (eps default)")
    conf.context_dim = _context_dim(model)
    return conf


def _targets(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "target" and isinstance(v, str):
                yield v
            else:
                yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


def _context_dim(model: dict) -> Optional[int]:
    params = model.get("params") or {}
    for key in ("unet_config", "network_config"):
        net = params.get(key) if isinstance(params, dict) else None
        if isinstance(net, dict) and isinstance(net.get("params"), dict):
            value = net["params"].get("context_dim")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None
