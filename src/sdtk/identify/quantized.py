"""How a quantized file is stored, per component: block types, effective bits per weight, size
against bf16, which weights were kept in high precision, and which programs load it.

Facts on loaders: ../shared/reference/quantized-formats.md §1.5-1.7 (ComfyUI needs the
ComfyUI-GGUF nodes; Forge reads GGUF; stable-diffusion.cpp with --diffusion-model ignores the KV
metadata, so it cannot undo city96's SD1/SDXL conv reshape (`comfy.gguf.orig_shape.*`); stock
ggml refuses tensors of more than 4 dimensions; A1111 reads no GGUF).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, Optional

GGUF_LOADERS = ("ComfyUI with the ComfyUI-GGUF nodes (Unet Loader (GGUF))", "Forge", "stable-diffusion.cpp (--diffusion-model)")
GGUF_NOT = ("AUTOMATIC1111",)
# bitsandbytes 4-bit (reference §4.1, §4.3): Forge loads it (ForgeLoader4Bit); ComfyUI core has no
# bitsandbytes loader (a custom node is needed); diffusers/transformers use another key layout
BNB4_LOADERS = ("Forge",)
BNB4_NOT = ("ComfyUI core", "AUTOMATIC1111", "diffusers")
# caveats: (English text for the JSON, report message key + fields for the four languages)
CAVEATS = {
    "orig_shape": "reshaped conv weights (comfy.gguf.orig_shape.*): stable-diffusion.cpp ignores that metadata and cannot load them",
    "five_d": "tensors of more than 4 dimensions: stock ggml (stable-diffusion.cpp) refuses them; ComfyUI-GGUF reads them",
    "no_arch": "no general.architecture: ComfyUI-GGUF loads it in compatibility mode (architecture guessed from names)",
    "bnb4_loaders": "ComfyUI needs a bitsandbytes NF4 custom node; diffusers and transformers use another key layout (convert the file first)",
    "double_quant": "double-quantized absmax (8-bit) on {n} of {total} weights, as in Forge's v1 FLUX NF4 file",
}


def _caveat(q: Dict[str, Any], code: str, **fields) -> None:
    q["caveats"].append(CAVEATS[code].format(**fields))
    q["caveat_keys"].append({"key": f"quant.caveat.{code}", "fields": fields})
HIGH_PRECISION = {"F32", "F16", "BF16", "F64"}


def describe_quantization(cat, components: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """For a GGUF catalogue: the quantization summary (None for other formats)."""
    if getattr(cat, "format", None) != "gguf":
        return None
    by_component = {}
    listed = set()
    for name, comp in components.items():
        keys = [k for k in comp.keys if k in cat.tensors]
        listed.update(keys)
        if keys:
            by_component[name] = _summarise(cat, keys)
    rest = [k for k in cat.tensors if k not in listed]
    if rest:
        by_component["other" if components else "file"] = _summarise(cat, rest)
    overall = _summarise(cat, list(cat.tensors))
    loaders, notes = list(GGUF_LOADERS), {"caveats": [], "caveat_keys": []}
    if any(k.startswith("comfy.gguf.orig_shape.") for k in cat.kv):
        loaders.remove("stable-diffusion.cpp (--diffusion-model)")
        _caveat(notes, "orig_shape")
    if any(len(t.ne) > 4 for t in cat.tensors.values()):
        _caveat(notes, "five_d")
        if "stable-diffusion.cpp (--diffusion-model)" in loaders:
            loaders.remove("stable-diffusion.cpp (--diffusion-model)")
    arch = cat.architecture
    if arch is None:
        _caveat(notes, "no_arch")
    ftype = cat.kv.get("general.file_type")
    from sdtk.quant.ggml_types import FILE_TYPE_NAME

    return {
        "format": "gguf",
        "architecture": arch,
        "file_type": FILE_TYPE_NAME.get(ftype.value) if ftype is not None and isinstance(ftype.value, int) else None,
        "main_type": overall["main_type"],
        "bits_per_weight": overall["bits_per_weight"],
        "bytes": overall["bytes"],
        "bf16_bytes": overall["bf16_bytes"],
        "components": by_component,
        "loaders": loaders,
        "not_loaders": list(GGUF_NOT),
        **notes,
    }


def describe_bnb4(raw: Mapping[str, Any], components: Mapping[str, Any]) -> Dict[str, Any]:
    """For a bitsandbytes 4-bit file (Forge NF4/FP4; `raw`: the file's tensors, `components`: keys
    of the dequantized view): the same summary as for GGUF, with NF4/FP4 as the quantized type."""
    from sdtk.quant.nf4 import AUX, STATE_SUFFIXES

    states = {}
    for k in raw:
        suffix = next((s for s in STATE_SUFFIXES if k.endswith(s)), None)
        if suffix is not None:
            states[k[: -len(suffix)]] = suffix.rsplit("__", 1)[1].upper()
    nested = sum(1 for w in states if w + ".nested_absmax" in raw)

    def summarise(keys: List[str], view_params: Mapping[str, int]) -> Dict[str, Any]:
        types: Counter = Counter()
        params_by_type: Counter = Counter()
        stored = params = kept_params = 0
        kept: List[str] = []
        for k in keys:
            t = raw[k]
            kind = states.get(k, t.dtype.name)
            n = view_params.get(k, t.numel)
            types[kind] += 1
            params_by_type[kind] += n
            stored += t.nbytes + sum(raw[k + a].nbytes for a in AUX if k in states and k + a in raw)
            stored += sum(raw[k + s].nbytes for s in STATE_SUFFIXES if k in states and k + s in raw)
            params += n
            if kind in HIGH_PRECISION and len(t.shape) >= 2 and n > 1024:
                kept.append(k)
                kept_params += n
        quantized = [n for n, _ in params_by_type.most_common() if n not in HIGH_PRECISION]
        main = quantized[0] if quantized else (params_by_type.most_common(1)[0][0] if params_by_type else None)
        return {"types": dict(sorted(types.items())), "main_type": main, "parameters": params, "bytes": stored,
                "bits_per_weight": round(stored * 8 / params, 3) if params else None, "bf16_bytes": params * 2,
                "size_vs_bf16": round(stored / (params * 2), 4) if params else None,
                "high_precision_weights": len(kept), "high_precision_parameters": kept_params,
                "high_precision_examples": kept[:6]}

    from sdtk.quant.nf4 import _state

    view_params = {}
    for w in states:
        spec = _state("", raw[next(w + s for s in STATE_SUFFIXES if w + s in raw)])
        count = 1
        for d in spec["shape"]:
            count *= int(d)
        view_params[w] = count
    by_component, listed = {}, set()
    for name, comp in components.items():
        keys = [k for k in comp.keys if k in raw]
        listed.update(keys)
        if keys:
            by_component[name] = summarise(keys, view_params)
    aux = {k for w in states for k in [w + a for a in AUX] + [w + s for s in STATE_SUFFIXES]}
    rest = [k for k in raw if k not in listed and k not in aux]
    if rest:
        by_component["other" if components else "file"] = summarise(rest, view_params)
    # the headline: the component(s) holding the 4-bit weights (a bundle's text encoders/VAE are not quantized)
    quantized_keys = [k for name, comp in components.items() if any(k in states for k in comp.keys) for k in comp.keys if k in raw]
    overall = summarise(quantized_keys or [k for k in raw if k not in aux], view_params)
    notes: Dict[str, Any] = {"caveats": [], "caveat_keys": []}
    _caveat(notes, "bnb4_loaders")
    if nested:
        _caveat(notes, "double_quant", n=nested, total=len(states))
    return {
        "format": "bitsandbytes-4bit",
        "architecture": None,
        "file_type": None,
        "layout": "Forge v1 (double quant)" if nested else "Forge v2 (f32 absmax)",
        "main_type": overall["main_type"],
        "bits_per_weight": overall["bits_per_weight"],
        "bytes": overall["bytes"],
        "bf16_bytes": overall["bf16_bytes"],
        "components": by_component,
        "loaders": list(BNB4_LOADERS),
        "not_loaders": list(BNB4_NOT),
        **notes,
    }


def _summarise(cat, keys: List[str]) -> Dict[str, Any]:
    types: Counter = Counter()
    params_by_type: Counter = Counter()
    stored = params = 0
    kept: List[str] = []
    kept_params = 0
    for k in keys:
        t = cat.tensors[k]
        name = t.ggml_type.name
        types[name] += 1
        params_by_type[name] += t.numel
        stored += t.stored_nbytes
        params += t.numel
        if name in HIGH_PRECISION and len(t.shape) >= 2 and t.numel > 1024:
            kept.append(k)
            kept_params += t.numel
    quantized = [n for n, _ in params_by_type.most_common() if n not in HIGH_PRECISION]
    main = quantized[0] if quantized else (params_by_type.most_common(1)[0][0] if params_by_type else None)
    return {
        "types": dict(sorted(types.items())),
        "main_type": main,
        "parameters": params,
        "bytes": stored,
        "bits_per_weight": round(stored * 8 / params, 3) if params else None,
        "bf16_bytes": params * 2,
        "size_vs_bf16": round(stored / (params * 2), 4) if params else None,
        "high_precision_weights": len(kept),
        "high_precision_parameters": kept_params,
        "high_precision_examples": kept[:6],
    }


def quant_precision(q: Dict[str, Any]) -> str:
    """The Precision line of a quantized file: "GGUF Q4_K_S (Q4_K, 4.6 bits/weight)",
    "bitsandbytes NF4, Forge v2 (f32 absmax) (4.52 bits/weight)"."""
    if q.get("format") == "bitsandbytes-4bit":
        bpw = f" ({q['bits_per_weight']:.2f} bits/weight)" if q.get("bits_per_weight") else ""
        return f"bitsandbytes {q.get('main_type')}, {q['layout']}{bpw}"
    ftype = q.get("file_type")
    main = q.get("main_type")
    head = f"GGUF {ftype}" if ftype else f"GGUF {main}"
    detail = [main] if main and main != ftype else []
    if q.get("bits_per_weight"):
        detail.append(f"{q['bits_per_weight']:.2f} bits/weight")
    return head + (f" ({', '.join(detail)})" if detail else "")
