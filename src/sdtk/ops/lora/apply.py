"""`lora apply`: bake adapters into a checkpoint (or a stand-alone UNet/DiT file), streaming.

Plan first (adapters/matching.py: every module resolved and its shapes checked before a byte is
written; a LoRA that matches nothing, or only the text encoder of a base whose UNet/DiT it does not
fit, is refused), write second: the
output is written tensor by tensor: untouched tensors are copied byte for byte (file to file),
touched ones are read, converted to float32 once, patched by each module in order (LoRAs in the
order given), checked for NaN/inf, and cast once to the base's dtype (overflow counted).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.adapters.matching import LoraInput, Patch
from sdtk.adapters.reading import Adapter
from sdtk.architectures.lora_keys import Target
from sdtk.errors import SdtkError
from sdtk.ops.lora.patch import patch_bias, patch_weight
from sdtk.tensors import LazyTensor

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Views: the target as the adapter sees it, and back.

def _view(full: np.ndarray, t: Target, role: str) -> np.ndarray:
    v = full
    if t.rows is not None:
        off, n = t.rows
        v = v[off:off + n]
    if role == "weight" and t.transpose:
        v = v.T
    if t.swap_halves:
        half = v.shape[0] // 2
        v = np.concatenate([v[half:], v[:half]], axis=0)
    return np.ascontiguousarray(v)  # `full` itself when nothing is sliced or transposed


def _put(full: np.ndarray, t: Target, role: str, value: np.ndarray) -> None:
    if value is full:
        return
    v = value
    if t.swap_halves:
        half = v.shape[0] - v.shape[0] // 2
        v = np.concatenate([v[half:], v[:half]], axis=0)
    if role == "weight" and t.transpose:
        v = v.T
    if t.rows is not None:
        off, n = t.rows
        full[off:off + n] = v
    else:
        full[...] = v


def patched_array(base: np.ndarray, patches: Sequence[Patch], peft_configs: Sequence[dict],
                  dora_convention: str = "comfyui", reuse: bool = False) -> np.ndarray:
    """The float32 result of applying `patches` in order to `base`: a new array, or with `reuse`
    this thread's working buffer (sdtk.ops.lora.scratch; valid until its next bake step)."""
    from sdtk import fastcast
    from sdtk.ops.lora.scratch import scratch

    if reuse:
        full = scratch(base.size).reshape(base.shape)
        fastcast.assign(full, base)
    else:
        full = fastcast.astype(base, F32)  # always a new, writable array (base may be a read-only mmap view)
    for p in patches:
        view = _view(full, p.target, p.role)
        if p.role == "bias":
            new = patch_bias(p.module, view, p.strength)
        else:
            try:
                new = patch_weight(p.module, view, p.strength, peft_configs[p.lora], dora_convention)
            except ValueError as e:
                raise SdtkError(None, f"{p.module.name}: {e}") from None
        _put(full, p.target, p.role, new.astype(F32, copy=False))
    return full


@dataclass
class ApplyStats:
    computed: int = 0
    copied: int = 0
    overflow: Counter = field(default_factory=Counter)  # key -> values that did not fit the dtype


def apply_plan(base_cat, patches: Dict[str, List[Patch]], peft_configs: Sequence[dict], lora_files: Sequence[str],
               dora_convention: str = "comfyui", stats: Optional[ApplyStats] = None,
               out_dtypes: Optional[Dict[str, object]] = None) -> List[LazyTensor]:
    """The write plan: the base's tensors in order, touched ones computed when written.
    `out_dtypes` (key -> DType): tensors written in another dtype than they read as (the
    dequantized weights of a quantized base), touched or not; cast once."""
    from sdtk.ops.cast import cast_array, cast_f16_counting_nonfinite

    stats = stats if stats is not None else ApplyStats()
    out_dtypes = out_dtypes or {}
    plan: List[LazyTensor] = []
    for key, t in base_cat.tensors.items():
        dst = out_dtypes.get(key, t.dtype)
        if key not in patches:
            stats.copied += 1
            if dst == t.dtype:
                plan.append(t)
                continue

            def cast(t=t, key=key, dst=dst):
                out, overflow = cast_array(np.asarray(t.read()), dst)
                if overflow:
                    stats.overflow[key] += overflow
                return out

            plan.append(LazyTensor(key, dst, tuple(t.shape), cast))
            continue
        if not t.dtype.is_float:
            raise SdtkError(base_cat.path, f"tensor {key!r} is {t.dtype.short}; a LoRA cannot be baked into it")
        stats.computed += 1

        def load(t=t, key=key, dst=dst):
            result = patched_array(t.read(), patches[key], peft_configs, dora_convention, reuse=True)
            # fp16 (the usual base): the cast counts NaN/inf in the same pass; else a scan first
            fused = cast_f16_counting_nonfinite(result) if dst.numpy == np.float16 else None
            bad = fused[2] if fused is not None else (0 if _all_finite(result) else
                                                      int(np.size(result) - np.count_nonzero(np.isfinite(result))))
            if bad:
                files = sorted({os.path.basename(lora_files[p.lora]) for p in patches[key]})
                raise SdtkError(files[0] if len(files) == 1 else None,
                                f"applying it to {key} gives {bad} NaN/inf values; nothing was written")
            if fused is not None:
                out, overflow = fused[0], fused[1]
            else:
                out, overflow = cast_array(result, dst) if dst.numpy != result.dtype else (result.copy(), 0)
            if overflow:
                stats.overflow[key] += overflow
            return out

        plan.append(LazyTensor(key, dst, tuple(t.shape), load))
    return plan


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or inf in `a`. A finite sum (no temporary array) proves it: NaN and inf propagate
    through a sum; an infinite or NaN sum of finite values (overflow) is checked value by value."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(a, axis=None)):
            return True
    return bool(np.isfinite(a).all())


def check_finite_adapters(adapters: Sequence[Tuple[LoraInput, Adapter]], used: Dict[str, List[Patch]]) -> None:
    """Refuse an adapter whose tensors hold NaN or inf (before anything is written)."""
    seen = set()
    for patches in used.values():
        for p in patches:
            if id(p.module) in seen:
                continue
            seen.add(id(p.module))
            for role, t in p.module.parts.items():
                if t.dtype.is_float and t.numel and not np.isfinite(np.asarray(t.read(), dtype=F32)).all():
                    raise SdtkError(adapters[p.lora][0].path, f"tensor {p.module.name} {role} holds NaN or inf values")


def lora_file_facts(path: str) -> Dict[str, str]:
    """sha256 of the file and the addnet hash (sha256 after the safetensors header: Civitai
    AutoV3's source; reference/lora.md §4.2); both 64 hex."""
    from sdtk.hashing.simple import file_hashes

    h = file_hashes(path, ["sha256", "autov3"])
    return {"sha256": h["sha256"], "addnet": h["autov3"], "autov3": h["autov3"][:12]}
