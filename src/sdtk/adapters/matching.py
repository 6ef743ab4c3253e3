"""Matching adapters to a base: which base weight each module patches, with what strength, and
why the others do not fit.

Every LoRA module is resolved through the base's alias table (architectures/lora_keys.py) and its
shapes checked; nothing is read but alphas. Used by `lora apply` (ops/lora/apply.py) to plan a
bake and by inspect (identify/lora_facts.py) to say how a LoRA fits a base.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.adapters.block_weights import BlockWeights, block_of, check_fits, describe, parse_block_weights, unet_layout
from sdtk.adapters.reading import Adapter, Module, natural_shape, touches_bias, touches_weight
from sdtk.architectures.lora_keys import AliasTable, Target, build_alias_table, name_component
from sdtk.errors import SdtkError, UsageError


@dataclass
class LoraInput:
    """One `LORA[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS]` argument."""

    path: str
    strength: float = 1.0
    te_strength: Optional[float] = None  # None: the same as `strength`
    block_weights: Optional[BlockWeights] = None  # LoRA Block Weight factors (adapters/block_weights.py)

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
    if m.kind == "boft":  # (stages, blocks, b, b); the butterfly pairs rows 2^i * b/2 apart, so b is even
        stages, blocks, b, _ = p["oft_blocks"].shape
        if blocks * b != target_shape[0] or b % 2 or target_shape[0] % (2 ** stages * (b // 2) if b else 1):
            return f"shape mismatch: BOFT {stages} stages of {blocks} blocks of {b} for {target_shape[0]} rows"
        return None
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


UNSUPPORTED = {"incomplete": "incomplete module (missing tensors)"}


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
