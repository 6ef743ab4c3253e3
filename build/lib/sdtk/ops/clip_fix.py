"""CLIP text-encoder repairs: position ids reset to 0..n-1 (int64), NovelAI-era key names.

- `position_ids` ([1, 77] int64) index the position embedding. Merges that multiplied them by a
  float left values like 75.9975 (or a float dtype), and truncation then shifts the ids so a
  prompt token is ignored. Reset: arange(n) as int64, shape kept (architectures.md).
- NovelAI-era SD1 files keep CLIP-L under `cond_stage_model.transformer.` without `text_model.`;
  A1111 renames them on load (`checkpoint_dict_replacements_sd1` in modules/sd_models.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from sdtk.tensors import DTYPES, LazyTensor

# Old prefix -> new prefix (source: A1111 modules/sd_models.py checkpoint_dict_replacements_sd1).
NOVELAI_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
)
POSITION_IDS_SUFFIX = "embeddings.position_ids"  # SD1, SDXL CLIP-L, SD3/FLUX all-in-one CLIP-L/G


@dataclass
class ClipFixResult:
    plan: List[LazyTensor]
    renamed: List[Tuple[str, str]] = field(default_factory=list)
    reset: List[str] = field(default_factory=list)  # position_ids tensors rewritten
    were_broken: List[str] = field(default_factory=list)  # of those, the ones that were not 0..n-1 int64


def renamed_key(key: str) -> str:
    for old, new in NOVELAI_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def healthy_position_ids(t: LazyTensor) -> bool:
    if t.dtype.name != "I64" or not t.shape:
        return False
    values = t.read()
    return bool(np.array_equal(values.reshape(-1, t.shape[-1]), np.broadcast_to(np.arange(t.shape[-1]), values.reshape(-1, t.shape[-1]).shape)))


def position_ids_tensor(name: str, shape: Tuple[int, ...]) -> LazyTensor:
    shape = tuple(shape) if shape else (1, 77)
    n = shape[-1]
    return LazyTensor(name, DTYPES["I64"], shape, lambda: np.broadcast_to(np.arange(n, dtype=np.int64), shape).copy())


def fix_clip(plan: Sequence[LazyTensor]) -> ClipFixResult:
    out: List[LazyTensor] = []
    result = ClipFixResult(out)
    names = {t.name for t in plan}
    for t in plan:
        new_name = renamed_key(t.name)
        if new_name != t.name:
            if new_name in names:  # both spellings present: keep the modern one
                result.renamed.append((t.name, "(dropped: duplicate of " + new_name + ")"))
                continue
            result.renamed.append((t.name, new_name))
            t = LazyTensor(new_name, t.dtype, tuple(t.shape), t.loader, t.span)
        if t.name.endswith(POSITION_IDS_SUFFIX):
            if not healthy_position_ids(t):
                result.were_broken.append(t.name)
            result.reset.append(t.name)
            t = position_ids_tensor(t.name, tuple(t.shape))
        out.append(t)
    return result
