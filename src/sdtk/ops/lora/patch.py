"""One adapter module applied to one weight (or bias): W (float32) -> W' (float32).

The weight given is the target as the adapter sees it (a row slice, transposed or half-swapped
view of the checkpoint's tensor, see architectures/lora_keys.py); additive types add m * s * dW
reshaped to it, DoRA and OFT depend on W and are applied in order (reference/lora.md §2.7).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from sdtk.ops.lora import math as M
from sdtk.adapters.reading import Module
from sdtk.ops.lora.scratch import scratch

F32 = np.float32


def _f32(m: Module, role: str) -> Optional[np.ndarray]:
    t = m.parts.get(role)
    return None if t is None else np.asarray(t.read(), dtype=F32)


def module_scale(m: Module, peft: Dict[str, object]) -> float:
    """alpha / rank by the file's per-module alpha, else the header's PEFT config (lora_alpha / r,
    rsLoRA alpha / sqrt(r), alpha_pattern / rank_pattern by module-name suffix), else 1."""
    alpha = m.scalar("alpha")
    if m.kind == "lokr":
        ranks = [m.parts[r].shape[0] if r in m.parts else None for r in ("lokr_w1_b", "lokr_w2_b")]
        return M.lokr_scale(alpha, *ranks)
    rank = m.rank or 0
    if alpha is None and peft and m.kind in ("lora", "locon", "loha"):
        lora_alpha, r = peft.get("lora_alpha"), peft.get("r")
        for pat, val in (peft.get("alpha_pattern") or {}).items():
            if m.name.endswith(pat):
                lora_alpha = val
        for pat, val in (peft.get("rank_pattern") or {}).items():
            if m.name.endswith(pat):
                r = val
        if lora_alpha is not None:
            r = rank or r
            if peft.get("use_rslora"):
                return float(lora_alpha) / float(np.sqrt(r))
            return float(lora_alpha) / float(r)
    return M.rank_scale(alpha, rank)


def additive_delta(m: Module, weight: np.ndarray) -> Optional[np.ndarray]:
    """The unscaled dW of an additive type, reshaped to `weight` (None for OFT / set)."""
    k = m.kind
    if k in ("lora", "locon"):
        d, _ = M.lora_delta(_f32(m, "up"), _f32(m, "down"), _f32(m, "mid"))
    elif k == "loha":
        d = M.loha_delta(_f32(m, "hada_w1_a"), _f32(m, "hada_w1_b"), _f32(m, "hada_w2_a"), _f32(m, "hada_w2_b"),
                         _f32(m, "hada_t1"), _f32(m, "hada_t2"))
    elif k == "lokr":
        d = M.lokr_delta(_f32(m, "lokr_w1"), _f32(m, "lokr_w1_a"), _f32(m, "lokr_w1_b"), _f32(m, "lokr_w2"),
                         _f32(m, "lokr_w2_a"), _f32(m, "lokr_w2_b"), _f32(m, "lokr_t2"))
    elif k == "glora":
        d = M.glora_delta(weight, _f32(m, "a1"), _f32(m, "a2"), _f32(m, "b1"), _f32(m, "b2"))
    elif k == "ia3":
        return M.ia3_delta(weight, _f32(m, "weight"), bool(m.scalar("on_input")))
    elif k == "full":
        d = _f32(m, "diff")
        if d is None:
            return None
    elif k == "norm":
        d = _f32(m, "w_norm")
        if d is None:
            return None
    else:
        return None
    if k in ("full", "norm"):
        d = np.array(d, dtype=F32, copy=True)  # the file's own (read-only) bytes otherwise
    return d.reshape(weight.shape)


def glora_scale(m: Module, weight: np.ndarray) -> float:
    a1 = m.parts["a1"].shape
    rank = m.parts["a2"].shape[0] if a1[0] == weight.shape[1] else a1[0]
    return M.rank_scale(m.scalar("alpha"), rank)


def patch_weight(m: Module, weight: np.ndarray, strength: float, peft: Dict[str, object],
                 dora_convention: str = "comfyui") -> np.ndarray:
    """W' for the weight of module `m` at `strength` (float32 in, float32 out)."""
    k = m.kind
    if k == "set":
        return _f32(m, "set_weight").reshape(weight.shape).copy()
    if k in ("oft", "boft"):
        blocks = _f32(m, "oft_blocks")
        alpha = m.scalar("alpha")
        # the constraint is alpha * out_dim for both (kohya oft.py; LyCORIS diag_oft.py / boft.py)
        constraint = None if alpha is None else alpha * weight.shape[0]
        rot = M.oft_rotation(blocks, constraint)
        if k == "boft":
            return M.boft_apply(weight, rot, strength, _f32(m, "rescale"))
        return M.oft_apply(weight, rot, strength, _f32(m, "rescale"))
    if k in ("lora", "locon") and "mid" not in m.parts and not m.dora and weight.flags.c_contiguous \
            and m.parts["up"].shape[0] == weight.shape[0]:
        M.add_product(weight, _f32(m, "up"), _f32(m, "down"), strength * module_scale(m, peft))
        return weight
    if k == "loha" and not m.dora and "hada_t1" not in m.parts and weight.flags.c_contiguous \
            and m.parts["hada_w1_a"].shape[0] == weight.shape[0]:
        M.add_hadamard(weight, _f32(m, "hada_w1_a"), _f32(m, "hada_w1_b"), _f32(m, "hada_w2_a"), _f32(m, "hada_w2_b"),
                       F32(strength * module_scale(m, peft)), buffers=scratch)
        return weight
    delta = additive_delta(m, weight)
    if delta is None:
        return weight
    if k in ("ia3", "full", "norm"):
        scale = 1.0
    elif k == "glora":
        scale = glora_scale(m, weight)
    else:
        scale = module_scale(m, peft)
    if m.dora:
        magnitude = _f32(m, "dora_scale") if "dora_scale" in m.parts else _f32(m, "magnitude")
        axis = M.dora_axis(tuple(magnitude.shape), tuple(weight.shape), peft="magnitude" in m.parts)
        return M.dora_apply(weight, F32(scale) * delta, magnitude, strength, axis, dora_convention)
    delta *= F32(strength * scale)
    weight += delta  # in place: the caller's float32 working copy
    return weight


def patch_bias(m: Module, bias: np.ndarray, strength: float) -> np.ndarray:
    """b' = b + m * (diff_b or b_norm)."""
    d = _f32(m, "diff_b")
    if d is None:
        d = _f32(m, "b_norm")
    if d is None:
        return bias
    bias += F32(strength) * d.reshape(bias.shape)
    return bias
