"""`lora apply`: bake adapters into a checkpoint (or a stand-alone UNet/DiT file), streaming.

Plan first, write second: every LoRA module is resolved through the base's alias table
(architectures/lora_keys.py) and its shapes checked before a byte is written; a LoRA that matches
nothing, or only the text encoder of a base whose UNet/DiT it does not fit, is refused. Then the
output is written tensor by tensor: untouched tensors are copied byte for byte (file to file),
touched ones are read, converted to float32 once, patched by each module in order (LoRAs in the
order given), checked for NaN/inf, and cast once to the base's dtype (overflow counted).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.architectures.lora_keys import AliasTable, Target, build_alias_table, name_component
from sdtk.errors import SdtkError, UsageError
from sdtk.ops.lora.adapters import KIND_LABELS, Adapter, Module, natural_shape, read_adapter
from sdtk.ops.lora.block_weights import BlockWeights, block_of, check_fits, describe, parse_block_weights, unet_layout
from sdtk.ops.lora.patch import patch_bias, patch_weight, touches_bias, touches_weight
from sdtk.tensors import LazyTensor

F32 = np.float32


@dataclass
class LoraInput:
    """One `LORA[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS]` argument."""

    path: str
    strength: float = 1.0
    te_strength: Optional[float] = None  # None: the same as `strength`
    block_weights: Optional[BlockWeights] = None  # LoRA Block Weight factors (block_weights.py)

    @property
    def text_strength(self) -> float:
        return self.strength if self.te_strength is None else self.te_strength


def parse_lora_argument(text: str) -> LoraInput:
    """`path`, `path:0.8`, `path:0.8:0.5`, each optionally followed by `:lbw=1,0,...` (A1111's
    `<lora:name:0.8:lbw=...>` syntax). The path is the longest `:`-joined prefix that names an
    existing file (paths may hold colons); what follows must be one or two finite numbers."""
    if os.path.exists(text):
        return LoraInput(text)
    parts = text.split(":")
    blocks = None
    if len(parts) > 1 and parts[-1].lower().startswith("lbw="):
        blocks = parse_block_weights(parts[-1][4:])
        parts = parts[:-1]
        if os.path.exists(":".join(parts)):
            return LoraInput(":".join(parts), block_weights=blocks)
    for n in (1, 2):
        if len(parts) > n and os.path.exists(":".join(parts[:-n])):
            path, extra = ":".join(parts[:-n]), parts[-n:]
            break
    else:
        numbers = [p for p in parts[-2:] if _number(p) is not None]
        path = ":".join(parts[: len(parts) - len(numbers)]) if numbers and len(parts) > len(numbers) else ":".join(parts)
        raise SdtkError(path, "no such file")
    values = [_number(x) for x in extra]
    for raw, value in zip(extra, values):
        if value is None:
            raise UsageError(None, f"{text!r}: strength {raw!r} is not a number; strengths must be numbers "
                                   f"(LORA[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS])")
        if not np.isfinite(value):
            raise UsageError(None, f"{text!r}: strength {raw!r} is not a finite number")
    return LoraInput(path, values[0], values[1] if len(values) > 1 else None, blocks)


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class Patch:
    lora: int  # index into the inputs
    module: Module
    target: Target
    strength: float
    role: str  # "weight" or "bias"


@dataclass
class LoraReport:
    """What one LoRA matched on this base."""

    file: str
    strength: float
    te_strength: float
    modules: int = 0
    matched: int = 0
    kinds: Counter = field(default_factory=Counter)
    components: Counter = field(default_factory=Counter)  # matched modules per base component
    unmatched: List[Tuple[str, str]] = field(default_factory=list)  # (module, why)
    ignored: List[str] = field(default_factory=list)
    base_guess: Optional[str] = None  # what the LoRA says it was made for (identify)
    hashes: Dict[str, str] = field(default_factory=dict)
    block_weights: Dict[str, float] = field(default_factory=dict)  # factors other than 1, by block id

    def as_dict(self) -> dict:
        return {"file": self.file, "strength": self.strength, "te_strength": self.te_strength,
                "modules": self.modules, "matched": self.matched, "kinds": dict(self.kinds),
                "components": dict(self.components),
                "unmatched": [{"module": m, "reason": r} for m, r in self.unmatched],
                "ignored": len(self.ignored), "made_for": self.base_guess, **({"hashes": self.hashes} if self.hashes else {}),
                **({"block_weights": self.block_weights} if self.block_weights else {})}


def _target_shape(target: Target, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if target.transpose:
        shape = tuple(reversed(shape)) if len(shape) == 2 else shape
    if target.rows is not None:
        shape = (target.rows[1],) + tuple(shape[1:])
    return tuple(shape)


def _check_shape(m: Module, target_shape: Tuple[int, ...]) -> Optional[str]:
    """Why module `m` cannot patch a weight of `target_shape`, or None when it can."""
    numel = int(np.prod(target_shape)) if target_shape else 1
    nat = natural_shape(m)
    if nat is not None:
        if int(np.prod(nat)) != numel or nat[0] != target_shape[0]:
            return f"shape mismatch: the LoRA gives {list(nat)}, the base weight is {list(target_shape)}"
        return None
    p = m.parts
    if m.kind == "ia3":
        n = p["weight"].numel
        on_input = bool(m.scalar("on_input"))
        want = target_shape[1] if on_input and len(target_shape) > 1 else target_shape[0]
        return None if n == want else f"shape mismatch: (IA)^3 vector of {n}, the base needs {want}"
    if m.kind == "oft":
        blocks = p["oft_blocks"].shape
        return None if blocks[0] * blocks[-1] == target_shape[0] else \
            f"shape mismatch: OFT {blocks[0]} blocks of {blocks[-1]} for {target_shape[0]} rows"
    if m.kind == "glora":
        b1, b2 = p["b1"].shape, p["b2"].shape
        if b1[0] * int(np.prod(b2[1:])) == numel or b2[0] * int(np.prod(b1[1:])) == numel:
            return None
        return f"shape mismatch: GLoRA for {list(b1)}x{list(b2)}, the base weight is {list(target_shape)}"
    if m.kind == "norm" and "w_norm" in p:
        return None if p["w_norm"].numel == numel else f"shape mismatch: w_norm {list(p['w_norm'].shape)} vs {list(target_shape)}"
    if m.kind == "set":
        return None if p["set_weight"].numel == numel else f"shape mismatch: set_weight {list(p['set_weight'].shape)} vs {list(target_shape)}"
    return None


UNSUPPORTED = {"boft": "BOFT (butterfly OFT) is not supported yet", "incomplete": "incomplete module (missing tensors)"}


def plan_patches(base_shapes: Dict[str, Tuple[int, ...]], adapters: Sequence[Tuple[LoraInput, Adapter]],
                 table: Optional[AliasTable] = None) -> Tuple[Dict[str, List[Patch]], List[LoraReport]]:
    """{base key: patches in order} and one report per LoRA; nothing is read but alphas."""
    table = table or build_alias_table(base_shapes)
    patches: Dict[str, List[Patch]] = {}
    reports: List[LoraReport] = []
    layout = unet_layout(base_shapes) if any(spec.block_weights for spec, _ in adapters) else None
    for i, (spec, adapter) in enumerate(adapters):
        rep = LoraReport(spec.path, spec.strength, spec.text_strength)
        if spec.block_weights is not None:
            check_fits(spec.block_weights, layout, "the base", spec.path)
            rep.block_weights = dict(describe(spec.block_weights))
        rep.ignored = list(adapter.ignored)
        for key in adapter.unknown:
            rep.unmatched.append((key, "unknown tensor (not an adapter suffix sdtk knows)"))
        for name, m in adapter.modules.items():
            rep.modules += 1
            if m.kind in UNSUPPORTED:
                rep.unmatched.append((name, UNSUPPORTED[m.kind]))
                continue
            target = table.resolve(name)
            if target is None:
                why = "ambiguous name" if name in table.ambiguous else "no such module in the base"
                rep.unmatched.append((name, why))
                continue
            wshape = base_shapes[target.weight]
            problem = _check_shape(m, _target_shape(target, wshape)) if touches_weight(m) else None
            if problem is None and touches_bias(m) and target.bias is None:
                problem = "the LoRA changes a bias the base does not have"
            if problem:
                rep.unmatched.append((name, problem))
                continue
            strength = spec.strength if target.component == "unet" else spec.text_strength
            if spec.block_weights is not None:
                strength *= spec.block_weights.factor(block_of(target.component, target.weight))
            rep.matched += 1
            rep.kinds[m.kind + ("+dora" if m.dora else "")] += 1
            rep.components[target.component] += 1
            if touches_weight(m):
                patches.setdefault(target.weight, []).append(Patch(i, m, target, strength, "weight"))
            if touches_bias(m):
                patches.setdefault(target.bias, []).append(Patch(i, m, target, strength, "bias"))
        reports.append(rep)
    return patches, reports


def check_reports(reports: Sequence[LoraReport], base_label: str, allow_unmatched: bool) -> None:
    """Refuse a LoRA that matches nothing, only the text encoder of this base, or (without
    --allow-unmatched) leaves modules unmatched."""
    for rep in reports:
        made_for = f"{rep.base_guess} LoRA" if rep.base_guess else "LoRA"
        if rep.modules == 0:
            raise SdtkError(rep.file, "has no adapter modules (is it a LoRA?)")
        unet_unmatched = [m for m, _ in rep.unmatched if name_component(m) == "unet"]
        if rep.matched == 0:
            first = rep.unmatched[0] if rep.unmatched else ("", "")
            raise SdtkError(rep.file, f"this {made_for} matches none of {base_label}'s weights "
                                      f"({rep.modules} modules; e.g. {first[0]}: {first[1]}): made for another architecture?")
        if unet_unmatched and rep.components.get("unet", 0) == 0:
            te = sum(v for k, v in rep.components.items() if k != "unet")
            msg = (f"this {made_for}: on {base_label} only its text-encoder part would apply ({te} of {rep.modules} modules; "
                   f"none of its {len(unet_unmatched)} UNet/DiT modules match, e.g. {unet_unmatched[0]})")
            if not allow_unmatched:
                raise SdtkError(rep.file, msg + "; --allow-unmatched to apply it anyway")
        elif rep.unmatched and not allow_unmatched:
            m, why = rep.unmatched[0]
            shape = sum(1 for _, w in rep.unmatched if w.startswith("shape mismatch"))
            hint = f"; this {made_for} may be for another architecture" if rep.base_guess and shape else ""
            raise SdtkError(rep.file, f"{len(rep.unmatched)} of {rep.modules} modules do not match {base_label} "
                                      f"({shape} by shape; e.g. {m}: {why}){hint}; --allow-unmatched applies the rest")


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
    from sdtk.ops.cast import cast_array

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
            if not _all_finite(result):
                bad = int(np.size(result) - np.count_nonzero(np.isfinite(result)))
                files = sorted({os.path.basename(lora_files[p.lora]) for p in patches[key]})
                raise SdtkError(files[0] if len(files) == 1 else None,
                                f"applying it to {key} gives {bad} NaN/inf values; nothing was written")
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
