"""Value views of quantized safetensors files (fp8-scaled, bitsandbytes 4-bit) for the commands
that work on values (merge, diff, convert): each quantized weight becomes its dequantized tensor
and the scale/state tensors go. GGUF needs none of this: its reader already dequantizes."""
from __future__ import annotations


def dequantize_catalogue(cat):
    """In place (a no-op for plain files); returns the catalogue."""
    from sdtk.quant import fp8_scaled, nf4

    if fp8_scaled.detect(cat.tensors) is not None:
        cat.tensors, notes = fp8_scaled.dequantized_view(cat.path, cat.tensors)
        cat.notes.extend(notes)
    if nf4.detect(cat.tensors) or any(k.endswith(".weight.absmax") for k in cat.tensors):
        cat.tensors, notes = nf4.dequantized_view(cat.path, cat.tensors)
        cat.notes.extend(notes)
    return cat
