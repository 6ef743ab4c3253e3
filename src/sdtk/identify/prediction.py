"""Prediction type (epsilon, v, flow, edm): every piece of evidence in the file and beside it,
each with its confidence, and the one that decides.

Evidence, strongest first (a stronger one wins a contradiction; the contradiction is reported):
| source | what | confidence |
|---|---|---|
| marker | `v_pred`, `edm_vpred.sigma_max`, `edm_mean` tensors (ComfyUI model_detection.py / model_base.py; Forge) | high |
| modelspec / kohya | `modelspec.prediction_type`, ComfyUI `modelspec.predict_key`, kohya `ss_v_parameterization` / `ss_base_model_version` | high |
| config | the `<model>.yaml` beside the file (what A1111 uses first; see config_yaml.py) | high |
| architecture | FLUX / SD3 ... are flow models by design | high |
| heuristic | SD2 only: diffusers `global_step == 875000` (512-base, epsilon); `--deep`: A1111's check, one UNet forward pass (sd2_forward.py: mean(unet(x) - x) < -1 -> v), and ComfyUI's statistic std(output_blocks.11.1.transformer_blocks.0.norm1.bias) > 0.09 -> v | medium / medium / low |
| family-default | SD1 / SDXL files without any evidence are epsilon (how every loader treats them) | medium |

SD2 files have no family default: 512 (epsilon) and 768-v share every shape. A1111 runs the UNet
once when no yaml is beside the file (`is_using_v_parameterization_for_sd2`); sdtk computes that
same pass in numpy when asked (`inspect --deep`, `convert --prediction-type auto`: it reads the
whole UNet), else without evidence the type stays unknown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

from sdtk.architectures import ARCHITECTURES
from sdtk.tensors import LazyTensor

CONFIDENCE_RANK = {"high": 3, "medium": 2, "low": 1, "none": 0}


@dataclass
class Evidence:
    source: str  # marker, modelspec, kohya, config, architecture, heuristic, family-default, stated
    type: str
    confidence: str
    detail: str
    method: Optional[str] = None  # heuristics: which program's rule ("a1111-forward", "comfyui-statistic", "global-step")

    def as_dict(self) -> dict:
        return {"source": self.source, "type": self.type, "confidence": self.confidence, "detail": self.detail}


@dataclass
class Prediction:
    type: Optional[str]
    confidence: str  # high, medium, low, none
    source: Optional[str]
    zero_terminal_snr: bool = False
    detail: Optional[str] = None
    evidence: List[Evidence] = field(default_factory=list)
    conflicts: List[Evidence] = field(default_factory=list)  # evidence that said otherwise and lost


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
SD2_HEURISTIC_THRESHOLD = 0.09  # ComfyUI model_detection.py (v when the std is above)
SD2_EPSILON_GLOBAL_STEP = 875000  # diffusers single_file_utils.py (SD2 512-base)
FAMILY_DEFAULTS = {"sd1": "epsilon", "sdxl": "epsilon", "sdxl-refiner": "epsilon"}
# sources in the order they win a contradiction
SOURCE_ORDER = ("stated", "marker", "modelspec", "kohya", "config", "architecture", "heuristic", "family-default")


def sd2_value_check(unet_tensors: Mapping[str, LazyTensor]) -> Optional[Evidence]:
    """ComfyUI's statistic for SD2 files without markers: the standard deviation of one norm
    bias of the last output block; above 0.09 -> v. Reads one 1280-value tensor (5 kB)."""
    import numpy as np

    return sd2_statistic(unet_tensors, lambda t: np.asarray(t.read()).astype(np.float64).reshape(-1).tolist())


def sd2_forward_check(unet_tensors: Mapping[str, LazyTensor]) -> Optional[Evidence]:
    """A1111's check (sd2_forward.py): one forward pass of the UNet on fixed inputs; medium
    confidence (it is how A1111 decides, and it measures the model's behaviour, not one tensor)."""
    from sdtk.identify.sd2_forward import A1111_THRESHOLD, a1111_forward_check

    result = a1111_forward_check(unet_tensors)
    if result is None:
        return None
    ptype, mean = result
    return Evidence("heuristic", ptype, "medium", method="a1111-forward", detail=f"forward check: mean(unet(x) - x) = {mean:.3f}, "
                                                  f"{'below' if ptype == 'v' else 'not below'} {A1111_THRESHOLD:g} (A1111's rule)")


def sd2_statistic(unet_tensors: Mapping[str, LazyTensor], read_values) -> Optional[Evidence]:
    """ComfyUI's SD2 statistic computed without numpy (1280 values through `read_values`): what
    ComfyUI's loader will decide, for comparing the programs even when `--deep` is not given."""
    t = unet_tensors.get(SD2_HEURISTIC_KEY)
    if t is None or not t.dtype.is_float or t.numel == 0:
        return None
    values = [float(v) for v in read_values(t)]
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    if not math.isfinite(std) or std == 0:
        return None
    ptype = "v" if std > SD2_HEURISTIC_THRESHOLD else "epsilon"
    return Evidence("heuristic", ptype, "low", method="comfyui-statistic", detail=f"value check: std({SD2_HEURISTIC_KEY}) = {std:.4f}, "
                    f"{'above' if ptype == 'v' else 'not above'} {SD2_HEURISTIC_THRESHOLD} (ComfyUI's rule)")


def gather(shapes_keys, metadata: Mapping[str, str], extras: Mapping, architecture: str, family: Optional[str],
           unet_tensors: Mapping[str, LazyTensor], config=None, deep: bool = False) -> List[Evidence]:
    """Every piece of evidence about the prediction type, strongest source first."""
    found: List[Evidence] = []
    for key, ptype, note in MARKERS:
        if key in shapes_keys:
            found.append(Evidence("marker", ptype, "high", note))
            break
    for key, values, source in METADATA_RULES:
        value = metadata.get(key)
        if value is not None and value.strip() in values:
            found.append(Evidence(source, values[value.strip()], "high", f"{key}={value.strip()}"))
            break
    config_fits = config is not None and (config.family is None or family is None or config.family == family)
    if config is not None and config.usable and config_fits and config.prediction in ("v", "epsilon", "edm"):
        name = config.path.rsplit("/", 1)[-1]
        found.append(Evidence("config", config.prediction, "high", f"{name} beside the file: {', '.join(config.details)}"))
    arch = ARCHITECTURES.get(architecture)
    if arch is not None and arch.prediction is not None:
        found.append(Evidence("architecture", arch.prediction, "high", f"{architecture} is a {arch.prediction} model"))
    if family == "sd2":
        step = extras.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool) and step == SD2_EPSILON_GLOBAL_STEP:
            found.append(Evidence("heuristic", "epsilon", "medium", f"global_step == {SD2_EPSILON_GLOBAL_STEP} (SD 2.x 512-base)",
                                  method="global-step"))
        if deep:
            forward = sd2_forward_check(unet_tensors)
            if forward is not None:
                found.append(forward)
            value = sd2_value_check(unet_tensors)
            if value is not None:
                found.append(value)
    if family in FAMILY_DEFAULTS:
        found.append(Evidence("family-default", FAMILY_DEFAULTS[family], "medium", f"{family} models are epsilon unless marked"))
    return found


def decide(found: List[Evidence], ztsnr: bool = False) -> Prediction:
    """The strongest evidence decides; weaker evidence that disagrees is kept as a conflict
    (a family default disagreeing is not a conflict: it is only a default)."""
    if not found:
        return Prediction(None, "none", None, ztsnr, None, [], [])
    ordered = sorted(found, key=lambda e: (-CONFIDENCE_RANK[e.confidence], SOURCE_ORDER.index(e.source)))
    best = ordered[0]
    conflicts = [e for e in ordered[1:] if e.type != best.type and e.source != "family-default"]
    return Prediction(best.type, best.confidence, best.source, ztsnr, best.detail, list(ordered), conflicts)


def predict(shapes_keys, metadata: Mapping[str, str], extras: Mapping, architecture: str, family: Optional[str],
            unet_tensors: Mapping[str, LazyTensor], config=None, deep: bool = False) -> Prediction:
    found = gather(shapes_keys, metadata, extras, architecture, family, unet_tensors, config, deep)
    return decide(found, "ztsnr" in shapes_keys)
