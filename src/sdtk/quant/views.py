"""Value views of quantized files for the commands that work on values (merge, diff, convert,
lora apply): each quantized weight becomes its dequantized tensor and the scale/state tensors go.
fp8-scaled and bitsandbytes 4-bit files are rewritten here; a GGUF reader already dequantizes,
so only its quantized tensors are recorded. `cat.dequantized` names every such tensor with the
format it came from ("fp8-scaled", "nf4", "fp4", "Q8_0", ...)."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Optional


def dequantize_catalogue(cat):
    """In place (a no-op for plain files); returns the catalogue."""
    from sdtk.quant import fp8_scaled, nf4

    if getattr(cat, "dequantized", None):
        return cat  # done before
    found: Dict[str, str] = {}
    if fp8_scaled.detect(cat.tensors) is not None:
        before = cat.tensors
        cat.tensors, notes = fp8_scaled.dequantized_view(cat.path, cat.tensors)
        found.update({k: "fp8-scaled" for k, t in cat.tensors.items() if before.get(k) is not t})
        cat.notes.extend(notes)
    if nf4.detect(cat.tensors) or any(k.endswith(".weight.absmax") for k in cat.tensors):
        before = cat.tensors
        cat.tensors, notes = nf4.dequantized_view(cat.path, cat.tensors)
        for k, t in cat.tensors.items():
            if before.get(k) is not t:
                state = next((before[k + s] for s in nf4.STATE_SUFFIXES if k + s in before), None)
                found[k] = "fp4" if state is not None and state.name.endswith("fp4") else "nf4"
        cat.notes.extend(notes)
    for k, t in cat.tensors.items():  # GGUF: quantized tensors read as their f32 values
        gt = getattr(t, "ggml_type", None)
        if gt is not None and gt.quantized:
            found[k] = gt.name
    cat.dequantized = found
    return cat


def output_dtype(cat, requested: Optional[str] = None):
    """The dtype dequantized weights are written in: `requested` (fp32, bf16, fp16), else the
    dtype most of the file's unquantized 2-D+ float tensors have (the embedders and final layers
    fp8-scaled and GGUF files keep: bf16 for a bf16 source), else bf16."""
    from sdtk.tensors import DTYPES, dtype as parse_dtype

    if requested:
        return parse_dtype(requested)
    quantized = getattr(cat, "dequantized", {}) or {}
    counts = Counter(t.dtype.name for k, t in cat.tensors.items()
                     if k not in quantized and t.dtype.is_float and len(t.shape) >= 2 and t.dtype.itemsize >= 2)
    return DTYPES[counts.most_common(1)[0][0]] if counts else DTYPES["BF16"]


def summary(cat) -> Dict[str, int]:
    """{source format: tensors} of what was dequantized."""
    return dict(sorted(Counter((getattr(cat, "dequantized", {}) or {}).values()).items()))


DIFFUSION_PREFIX = "model.diffusion_model."  # LDM/ComfyUI checkpoints; GGUF files hold the bare names


def align_names(cat, reference) -> Optional[str]:
    """Give `cat` the naming of `reference` (another input's tensor names) when they differ only by
    the diffusion-model prefix: a GGUF file (bare names, as city96 writes them) beside a full
    checkpoint gets `model.diffusion_model.` added, or a checkpoint beside a GGUF file loses it
    (its VAE/text encoders then have no counterpart). In place; returns what was done or None."""
    ref = set(reference)
    names = list(cat.tensors)
    if not names or sum(k in ref for k in names) * 2 >= len(names):
        return None
    if not any(k.startswith(DIFFUSION_PREFIX) for k in names):
        renamed = {DIFFUSION_PREFIX + k: k for k in names}
        how = f"names prefixed with {DIFFUSION_PREFIX}"
    else:
        renamed = {k[len(DIFFUSION_PREFIX):]: k for k in names if k.startswith(DIFFUSION_PREFIX)}
        how = f"{DIFFUSION_PREFIX} prefix dropped (its other tensors have no counterpart)"
    if sum(k in ref for k in renamed) * 2 < len(renamed):
        return None  # not the same model under another prefix
    cat.tensors = {new: cat.tensors[old] for new, old in renamed.items()}
    cat.dequantized = {new: cat.dequantized[old] for new, old in renamed.items() if old in cat.dequantized}
    cat.notes.append(f"{how} to match the other input")
    return how
