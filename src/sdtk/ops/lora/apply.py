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


# ---------------------------------------------------------------------------------------------
# The fused bake: an fp16 weight patched a block of rows at a time, in cache.

ROW_BLOCK_VALUES = 1 << 18  # float32 values per row block (1 MiB): widened, patched, cast back in L2


def _row_patch(p: Patch, rows: int, peft_configs: Sequence[dict]):
    """(kind, factor, left, right...) of a patch the fused bake can apply a block of rows at a
    time, with the same float32 operations as patch_weight's fast paths; None otherwise."""
    from sdtk.ops.lora import math as M
    from sdtk.ops.lora.patch import module_scale

    m, t = p.module, p.target
    if p.role != "weight" or t.transpose or t.swap_halves or m.dora:
        return None
    off, n = t.rows if t.rows is not None else (0, rows)
    f32 = (lambda role: np.ascontiguousarray(M.flat2(np.asarray(m.parts[role].read(), dtype=F32))))
    if m.kind in ("lora", "locon") and "mid" not in m.parts and m.parts["up"].shape[0] == n:
        return ("lora", off, n, p.strength * module_scale(m, peft_configs[p.lora]), f32("up"), f32("down"))
    if m.kind == "loha" and "hada_t1" not in m.parts and m.parts["hada_w1_a"].shape[0] == n:
        return ("loha", off, n, F32(p.strength * module_scale(m, peft_configs[p.lora])),
                f32("hada_w1_a"), f32("hada_w1_b"), f32("hada_w2_a"), f32("hada_w2_b"))
    return None


def bake_f16_by_rows(base: np.ndarray, patches: Sequence[Patch], peft_configs: Sequence[dict]):
    """An fp16 weight with LoRA / LoCon / LoHa patches (whole weights or row slices) baked a block
    of rows at a time: widened to float32, patched in order, cast back to fp16 while the block is
    in cache, with NaN/inf counted in the cast. The same bytes as patched_array + the fp16 cast
    (each value gets the same float32 operations; tests/test_lora_apply_nonfinite.py), without a
    full-size float32 copy going through memory twice. Returns (fp16 array, overflowed, NaN/inf),
    or None when a patch or the machine needs the general path."""
    from sdtk import fastcast
    from sdtk.ops.lora import math as M
    from sdtk.ops.lora.scratch import scratch

    if base.dtype != np.float16 or base.ndim < 2 or not base.flags.c_contiguous:
        return None
    rows = base.shape[0]
    cols = base.size // rows if rows else 0
    ops = []
    for p in patches:
        op = _row_patch(p, rows, peft_configs)
        if op is None:
            return None
        ops.append(op)
    out = np.empty(base.shape, dtype=np.float16)
    src, dst = base.reshape(rows, cols), out.reshape(rows, cols)
    step = max(1, min(rows, ROW_BLOCK_VALUES // max(1, cols)))
    if len(ops) == 1 and ops[0][1:3] == (0, rows):
        fused = _bake_one_module(src, dst, step, ops[0])
        if fused is not None:
            return (out,) + fused
    overflow = nonfinite = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        blk = scratch((r1 - r0) * cols, "rows").reshape(r1 - r0, cols)
        if fastcast.cast_into(src[r0:r1], blk) is None:
            return None  # no F16C kernel: the general path
        for kind, off, n, factor, *parts in ops:
            lo, hi = max(r0, off), min(r1, off + n)
            if lo >= hi:
                continue
            part = blk[lo - r0:hi - r0]
            if kind == "lora":
                up, down = parts
                M.add_product(part, up[lo - off:hi - off], down, factor)
            else:
                a1, b1, a2, b2 = parts
                M.add_hadamard(part, a1[lo - off:hi - off], b1, a2[lo - off:hi - off], b2, factor, buffers=scratch)
        counts = fastcast.f32_to_f16_counting(blk.reshape(-1), dst[r0:r1].reshape(-1))
        if counts is None:
            return None
        overflow += counts[0]
        nonfinite += counts[1]
    return out, overflow, nonfinite


def _bake_one_module(src: np.ndarray, dst: np.ndarray, step: int, op):
    """One whole-weight LoRA or LoHa module: per block of rows the product(s) (BLAS), then the
    widening, the scaled add and the counting cast in one C pass (sdtk._fastcast f16_add_scaled /
    f16_add_hadamard): the float32 operations of add_product / add_hadamard on the widened block,
    in order. Returns (overflowed, NaN/inf) or None without the kernel."""
    from sdtk import fastcast
    from sdtk.ops.lora.scratch import scratch

    kind, _, _, factor, *parts = op
    rows, cols = src.shape
    overflow = nonfinite = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols
        if kind == "lora":
            up, down = parts
            p1 = np.matmul(up[r0:r1], down, out=scratch(n, "hadamard1").reshape(r1 - r0, cols))
            counts = fastcast.f16_add_product(src[r0:r1], p1, None, F32(factor), dst[r0:r1])
        else:
            a1, b1, a2, b2 = parts
            p1 = np.matmul(a1[r0:r1], b1, out=scratch(n, "hadamard1").reshape(r1 - r0, cols))
            p2 = np.matmul(a2[r0:r1], b2, out=scratch(n, "hadamard2").reshape(r1 - r0, cols))
            counts = fastcast.f16_add_product(src[r0:r1], p1, p2, factor, dst[r0:r1])
        if counts is None:
            return None
        overflow += counts[0]
        nonfinite += counts[1]
    return overflow, nonfinite


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
            raw = t.read()
            # fp16 (the usual base): baked a block of rows at a time, NaN/inf counted in the cast
            fused = bake_f16_by_rows(np.asarray(raw), patches[key], peft_configs) if dst.numpy == np.float16 else None
            if fused is None:
                result = patched_array(raw, patches[key], peft_configs, dora_convention, reuse=True)
                fused = cast_f16_counting_nonfinite(result) if dst.numpy == np.float16 else None
            else:
                result = None
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
