"""Prediction type (epsilon, v, flow, edm) from markers, metadata, sidecar config, the
architecture, or a documented heuristic, each with its confidence.

Sources: ComfyUI model_detection.py / model_base.py (v_pred, ztsnr, edm_vpred.*, edm_mean/std
markers; SD2 heuristic std(output_blocks.11.1.transformer_blocks.0.norm1.bias) > 0.09 -> v),
ModelSpec (modelspec.prediction_type), ComfyUI (modelspec.predict_key), kohya
(ss_v_parameterization), diffusers single_file_utils (global_step 875000 -> SD2 512 epsilon),
A1111 (a `<model>.yaml` with `parameterization: "v"`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    import numpy as np

from sdtk.architectures import ARCHITECTURES
from sdtk.tensors import LazyTensor


@dataclass
class Prediction:
    type: Optional[str]
    confidence: str  # high, medium, low, none
    source: Optional[str]
    zero_terminal_snr: bool = False
    detail: Optional[str] = None


# marker key -> (prediction type, source note). Rows: ComfyUI model_detection.py / model_base.py.
MARKERS = (
    ("edm_vpred.sigma_max", "v", "edm_vpred marker (EDM v-prediction)"),
    ("v_pred", "v", "v_pred marker"),
    ("edm_mean", "edm", "edm_mean/edm_std markers (Playground v2.5 EDM)"),
)
# metadata key -> value -> prediction type. Rows: ModelSpec README, ComfyUI, kohya sd-scripts.
METADATA_RULES = (
    ("modelspec.prediction_type", {"epsilon": "epsilon", "v": "v", "v_prediction": "v", "flow": "flow", "edm": "edm"}, "modelspec"),
    ("modelspec.predict_key", {"epsilon": "epsilon", "v": "v", "v_prediction": "v", "flow": "flow"}, "modelspec"),
    ("ss_v_parameterization", {"True": "v", "true": "v"}, "kohya"),
    ("ss_base_model_version", {"sd_v2_v": "v", "sd_v2_768_v": "v"}, "kohya"),
)
SD2_HEURISTIC_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_HEURISTIC_THRESHOLD = 0.09  # ComfyUI model_detection.py
SD2_EPSILON_GLOBAL_STEP = 875000  # diffusers single_file_utils.py (SD2 512-base)
FAMILY_DEFAULTS = {"sd1": "epsilon", "sdxl": "epsilon", "sdxl-refiner": "epsilon"}


def predict(shapes_keys, metadata: Mapping[str, str], extras: Mapping, architecture: str, family: Optional[str],
            unet_tensors: Mapping[str, LazyTensor], config_text: Optional[str], deep: bool) -> Prediction:
    ztsnr = "ztsnr" in shapes_keys
    for key, ptype, note in MARKERS:
        if key in shapes_keys:
            return Prediction(ptype, "high", "marker", ztsnr, note)
    for key, values, source in METADATA_RULES:
        value = metadata.get(key)
        if value is not None and value.strip() in values:
            return Prediction(values[value.strip()], "high", source, ztsnr, f"{key}={value.strip()}")
    if config_text is not None:
        compact = config_text.replace(" ", "").replace("'", '"')
        if 'parameterization:"v"' in compact or "parameterization:v" in compact:
            return Prediction("v", "high", "config", ztsnr, "parameterization: v in the .yaml beside the file")
        if "parameterization" not in compact and family in ("sd1", "sd2", "sdxl"):
            return Prediction("epsilon", "medium", "config", ztsnr, ".yaml beside the file has no parameterization (epsilon)")
    arch = ARCHITECTURES.get(architecture)
    if arch is not None and arch.prediction is not None:
        return Prediction(arch.prediction, "high", "architecture", ztsnr, None)
    if family == "sd2":
        step = extras.get("global_step")
        if isinstance(step, int) and step == SD2_EPSILON_GLOBAL_STEP:
            return Prediction("epsilon", "medium", "heuristic", ztsnr, f"global_step == {SD2_EPSILON_GLOBAL_STEP} (SD 2.x 512-base)")
        if deep and SD2_HEURISTIC_KEY in unet_tensors:
            import numpy as np

            values = np.asarray(unet_tensors[SD2_HEURISTIC_KEY].read(), dtype=np.float64)
            std = float(values.std()) if values.size else 0.0
            if std > 0 and np.isfinite(std):
                ptype = "v" if std > SD2_HEURISTIC_THRESHOLD else "epsilon"
                return Prediction(ptype, "low", "heuristic", ztsnr, f"std(norm1.bias) = {std:.4f} (threshold {SD2_HEURISTIC_THRESHOLD})")
        return Prediction(None, "none", None, ztsnr, None)
    if family in FAMILY_DEFAULTS:
        return Prediction(FAMILY_DEFAULTS[family], "medium", "family-default", ztsnr, None)
    return Prediction(None, "none", None, ztsnr, None)
