"""bitsandbytes 4-bit weights (NF4 / FP4; Forge's FLUX NF4 files): read and dequantize in numpy,
bit-identical to bitsandbytes' `dequantize_4bit`.

Layout (../shared/reference/quantized-formats.md §4; bitsandbytes `QuantState.as_dict(packed=True)`):
for a Linear `L`: `L.weight` uint8 (packed codes, high nibble first, of the row-major weight),
`L.weight.absmax` (f32 per block, or uint8 codes when double-quantized), `L.weight.quant_map`
f32[16], double-quant `L.weight.nested_absmax` f32 and `L.weight.nested_quant_map` f32[256], and
`L.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 JSON with quant_type, blocksize,
dtype, shape (+ nested_blocksize, nested_offset).
Dequantization: absmax = nested_quant_map[code] * nested_absmax[i // nested_blocksize] +
nested_offset (double quant); value[i] = quant_map[code_i] * absmax[i // blocksize] in f32, then
cast to the recorded dtype. FP4 takes the sign from bit 3 of the code (bitsandbytes' kernels do;
its table's entry 8 is +0.0 but code 8 decodes to -0.0).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Dict, List, Tuple

from sdtk.errors import FormatError
from sdtk.tensors import DTYPES, LazyTensor, numel

if TYPE_CHECKING:  # numpy is imported where values are read: inspect of a header needs none
    import numpy as np

STATE_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def detect(tensors: Dict[str, LazyTensor]) -> bool:
    return any(k.endswith(STATE_SUFFIXES) for k in tensors)


def _state(path: str, t: LazyTensor) -> dict:
    import numpy as np

    try:
        spec = json.loads(np.asarray(t.read()).astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(path, f"{t.name}: the quant state is not UTF-8 JSON") from None
    if not isinstance(spec, dict) or spec.get("quant_type") not in ("nf4", "fp4") or not isinstance(spec.get("blocksize"), int) \
            or not isinstance(spec.get("shape"), list) or spec.get("dtype") not in _OUT_DTYPES:
        raise FormatError(path, f"{t.name}: quant state lacks quant_type/blocksize/shape/dtype")
    return spec


def _f32(t: LazyTensor) -> np.ndarray:
    import numpy as np

    return np.asarray(t.read(), dtype=np.float32).reshape(-1)


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, quant_map: np.ndarray, spec: dict,
                    nested_absmax=None, nested_quant_map=None) -> np.ndarray:
    """The bitsandbytes formula in numpy (f32), cast to the recorded dtype."""
    import numpy as np

    shape = tuple(spec["shape"])
    n = numel(shape)
    bs = spec["blocksize"]
    raw = np.asarray(packed).astype(np.uint8, copy=False).reshape(-1)
    codes = np.empty(raw.size * 2, dtype=np.uint8)
    codes[0::2], codes[1::2] = raw >> 4, raw & 15  # high nibble first
    codes = codes[:n]
    if nested_absmax is not None:
        nbs = spec.get("nested_blocksize", 256)
        idx = np.asarray(absmax).astype(np.int64).reshape(-1)
        scale = nested_quant_map[idx] * np.repeat(nested_absmax, nbs)[: idx.size]
        absmax = (scale + np.float32(spec.get("nested_offset", 0.0))).astype(np.float32)
    per_value = np.repeat(absmax.astype(np.float32), bs)[:n]
    table = quant_map.astype(np.float32)
    if spec["quant_type"] == "fp4":
        # bitsandbytes decodes FP4 as sign bit (code & 8) times magnitude: code 8 gives -0.0,
        # although its quant_map lists +0.0 there
        magnitude = table[codes & 7] * per_value
        values = np.where(codes & 8, -magnitude, magnitude)
    else:
        values = table[codes] * per_value
    out = DTYPES[_OUT_DTYPES[spec["dtype"]]].numpy
    return values.astype(out).reshape(shape) if out != np.float32 else values.reshape(shape)


def dequantized_view(path: str, tensors: Dict[str, LazyTensor]) -> Tuple[Dict[str, LazyTensor], List[str]]:
    """Each 4-bit weight as its dequantized tensor; the quant-state tensors go."""
    replace, drop = {}, set()
    for key, t in tensors.items():
        suffix = next((s for s in STATE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        wname = key[: -len(suffix)]
        parts = {a: tensors.get(wname + a) for a in AUX}
        weight = tensors.get(wname)
        if weight is None or parts[".absmax"] is None or parts[".quant_map"] is None:
            missing = [wname + a for a in ("", ".absmax", ".quant_map") if tensors.get(wname + a) is None]
            raise FormatError(path, f"4-bit weight {wname} is missing its quant state ({', '.join(missing)})")
        spec = _state(path, t)
        nested = parts[".absmax"].dtype.name == "U8"
        if nested and (parts[".nested_absmax"] is None or parts[".nested_quant_map"] is None):
            raise FormatError(path, f"4-bit weight {wname} is double-quantized but has no nested_absmax/nested_quant_map")

        def load(weight=weight, parts=parts, spec=spec, nested=nested):
            import numpy as np

            return dequantize_4bit(weight.read(), _f32(parts[".absmax"]) if not nested else np.asarray(parts[".absmax"].read()),
                                   _f32(parts[".quant_map"]), spec,
                                   _f32(parts[".nested_absmax"]) if nested else None,
                                   _f32(parts[".nested_quant_map"]) if nested else None)

        replace[wname] = LazyTensor(wname, DTYPES[_OUT_DTYPES[spec["dtype"]]], tuple(spec["shape"]), load)
        drop.add(key)
        drop.update(p.name for p in parts.values() if p is not None)
    # absmax/quant_map keys without a quant state: the file is missing its quant state
    orphans = [k for k in tensors if k.endswith(".weight.absmax") and k[: -len(".absmax")] not in replace]
    if orphans:
        raise FormatError(path, f"4-bit weight {orphans[0][:-len('.absmax')]} is missing its quant state (no quant_state.bitsandbytes__nf4 / __fp4)")
    out = {k: replace.get(k, t) for k, t in tensors.items() if k not in drop}
    return out, [f"{len(replace)} bitsandbytes 4-bit weights dequantized"] if replace else []
