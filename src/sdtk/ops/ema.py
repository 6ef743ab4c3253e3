"""EMA weights of SD1/SD2 training checkpoints: keep, drop, or use them as the model weights.

ldm's LitEma stores the EMA copy of `model.diffusion_model.X` as `model_ema.` + the key without
its leading `model.` and with every dot removed (`model.diffusion_model.input_blocks.0.0.weight`
-> `model_ema.diffusion_modelinput_blocks00weight`), plus `model_ema.decay` and
`model_ema.num_updates` (source: CompVis latent-diffusion `ldm/modules/ema.py`).
Dots are removed, so the mapping back goes through each UNet key's dots-removed form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence

from sdtk.architectures.prefixes import ema_key_for
from sdtk.errors import SdtkError
from sdtk.tensors import LazyTensor

EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
MIN_EMA_KEYS = 100  # "EMA present = more than ~100 model_ema.* keys" (architectures.md)
EMA_MODES = ("keep", "drop", "use")


def is_ema_key(key: str) -> bool:
    return key.startswith(EMA_PREFIX)


def has_ema(names: Iterable[str]) -> bool:
    return sum(1 for n in names if n.startswith(EMA_PREFIX)) > MIN_EMA_KEYS


@dataclass
class EmaResult:
    plan: List[LazyTensor]
    mode: str
    had_ema: bool
    replaced: int = 0  # UNet tensors whose values now come from the EMA copy
    dropped: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # UNet keys without an EMA copy (kept as is)


def apply_ema(plan: Sequence[LazyTensor], mode: str, path: str = None) -> EmaResult:
    """keep: unchanged. drop: remove `model_ema.*`. use: the UNet keys take the EMA values
    (same names, shapes checked), then `model_ema.*` is removed. `use` on a file without EMA
    raises SdtkError rather than silently writing the normal weights."""
    if mode not in EMA_MODES:
        raise ValueError(mode)
    names = [t.name for t in plan]
    had = has_ema(names)
    if mode == "keep":
        return EmaResult(list(plan), mode, had)
    ema = {t.name: t for t in plan if is_ema_key(t.name)}
    if mode == "drop":
        return EmaResult([t for t in plan if not is_ema_key(t.name)], mode, had, dropped=list(ema))
    if not had:
        raise SdtkError(path, f"has no EMA weights ({len(ema)} model_ema.* keys); --ema use needs a training "
                              "checkpoint with an EMA copy (use --ema drop or keep to convert the weights it has)")
    out: List[LazyTensor] = []
    replaced, missing = 0, []
    for t in plan:
        if is_ema_key(t.name):
            continue
        if t.name.startswith(UNET_PREFIX):
            source = ema.get(ema_key_for(t.name))
            if source is None:
                missing.append(t.name)
            elif tuple(source.shape) != tuple(t.shape):
                raise SdtkError(path, f"EMA tensor {source.name} has shape {list(source.shape)} but "
                                      f"{t.name} has {list(t.shape)}; the EMA copy does not match the UNet")
            else:
                t = LazyTensor(t.name, source.dtype, tuple(source.shape), source.loader, source.span)
                replaced += 1
        out.append(t)
    if replaced == 0:
        raise SdtkError(path, "its model_ema.* keys match none of the UNet keys; cannot use them as the weights")
    return EmaResult(out, mode, had, replaced=replaced, dropped=list(ema), missing=missing)


def ema_names_by_unet_key(names: Iterable[str]) -> Dict[str, str]:
    """{UNet key: EMA key} for every UNet key whose EMA copy is present."""
    names = list(names)
    present = {n for n in names if is_ema_key(n)}
    return {n: ema_key_for(n) for n in names if n.startswith(UNET_PREFIX) and ema_key_for(n) in present}
