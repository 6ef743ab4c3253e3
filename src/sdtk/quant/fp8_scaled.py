"""ComfyUI "fp8 scaled" checkpoints: read (current per-layer `comfy_quant` form and the legacy
`scaled_fp8` marker form), dequantize, and plan the current form for writing.

Formats (../shared/reference/quantized-formats.md §3.1-3.2; ComfyUI `comfy/ops.py`,
`comfy/quant_ops.py`, `comfy/utils.py convert_old_quants`):
- current: for a quantized Linear `L`: `L.weight` fp8 e4m3fn, `L.weight_scale` f32 scalar,
  `L.comfy_quant` = uint8 tensor holding UTF-8 JSON `{"format": "float8_e4m3fn"}` (optional
  `L.input_scale`); W = f32(weight) * weight_scale.
- legacy: a marker tensor `<prefix>scaled_fp8` (its dtype is the fp8 type), every scaled layer
  with `L.scale_weight` (f32, scalar or [1]); W = f32(weight) * scale_weight.
Writing: per-tensor scale s = max|W| / 448, q = e4m3fn(W / s) saturated at +-448 (torch's cast);
norms, biases, embedders and the final/input layers stay in the source precision.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import numpy as np

from sdtk.errors import FormatError, UnsupportedFormatError
from sdtk.tensors import DTYPES, LazyTensor

E4M3_MAX = 448.0
FORMAT_JSON = json.dumps({"format": "float8_e4m3fn"}, separators=(",", ":")).encode("utf-8")
FP8 = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# Substrings of weights kept in high precision besides 1-D tensors (Clybius' converter and
# city96's keep lists, reference §5.3): norms, embedders, and the input/final layers.
KEEP_SUBSTRINGS = ("norm", "embed", "emb.", "final_layer", "img_in.", "txt_in.", "time_in.", "vector_in.",
                   "guidance_in.", "proj_out", "conv_in", "conv_out", "distilled_guidance_layer")


def detect(tensors: Dict[str, LazyTensor]) -> Optional[str]:
    """ "comfy_quant", "scaled_fp8" or None."""
    if any(k.endswith(".comfy_quant") for k in tensors):
        return "comfy_quant"
    if any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in tensors):
        return "scaled_fp8"
    return None


def _scale_of(path: str, t: LazyTensor) -> np.float32:
    arr = np.asarray(t.read(), dtype=np.float32).reshape(-1)
    if arr.size != 1:
        raise UnsupportedFormatError(path, f"{t.name}: per-channel scales ({arr.size} values) are not supported, only one scale per tensor")
    return np.float32(arr[0])


def _dequantized(path: str, weight: LazyTensor, scale: LazyTensor) -> LazyTensor:
    def load() -> np.ndarray:
        q = np.asarray(weight.read())
        return (q.astype(np.float32) * _scale_of(path, scale)).astype(np.float32)

    return LazyTensor(weight.name, DTYPES["F32"], tuple(weight.shape), load)


def _comfy_format(path: str, t: LazyTensor) -> dict:
    raw = np.asarray(t.read()).astype(np.uint8).tobytes()
    try:
        spec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(path, f"{t.name} is not UTF-8 JSON") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("format") or (spec.get("params") or {}).get("format"), str):
        raise FormatError(path, f"{t.name} names no format")
    return spec


def dequantized_view(path: str, tensors: Dict[str, LazyTensor]) -> Tuple[Dict[str, LazyTensor], List[str]]:
    """The tensors of a scaled-fp8 file as plain float tensors: each scaled weight becomes its f32
    values, the scale/format/marker tensors go. Returns (tensors in file order, notes)."""
    kind = detect(tensors)
    if kind is None:
        return dict(tensors), []
    drop, replace = set(), {}
    if kind == "comfy_quant":
        for key in tensors:
            if not key.endswith(".comfy_quant"):
                continue
            layer = key[: -len(".comfy_quant")]
            spec = _comfy_format(path, tensors[key])
            fmt = spec.get("format") or spec["params"]["format"]
            if fmt not in FP8:
                raise UnsupportedFormatError(path, f"{layer}: ComfyUI quantization format {fmt!r} is not supported (sdtk reads float8_e4m3fn and float8_e5m2)")
            w, s = tensors.get(layer + ".weight"), tensors.get(layer + ".weight_scale")
            if w is None or s is None:
                raise FormatError(path, f"{layer}: comfy_quant layer without weight or weight_scale")
            replace[w.name] = _dequantized(path, w, s)
            drop.update({key, s.name, layer + ".input_scale"})
    else:
        for key in tensors:
            if key.endswith(".scale_weight"):
                layer = key[: -len(".scale_weight")]
                w = tensors.get(layer + ".weight")
                if w is None:
                    raise FormatError(path, f"{key} scales no {layer}.weight")
                replace[w.name] = _dequantized(path, w, tensors[key])
                drop.update({key, layer + ".scale_input"})
            elif key == "scaled_fp8" or key.endswith(".scaled_fp8"):
                drop.add(key)
    out = {k: replace.get(k, t) for k, t in tensors.items() if k not in drop}
    return out, [f"{len(replace)} fp8-scaled weights ({kind} form) dequantized to fp32"]


def keep_high_precision(name: str, shape) -> bool:
    return len(shape) != 2 or not name.endswith(".weight") or any(s in name for s in KEEP_SUBSTRINGS)

