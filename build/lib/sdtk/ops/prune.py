"""Prune: keep every key the architecture tables know (components, schedule buffers, markers),
drop training state, the EMA copy (unless kept) and junk; unknown keys go too unless
`keep_unknown`. Every dropped key is reported with its reason. Non-tensor training state of
pickled checkpoints (optimizer states, epoch, global_step, callbacks) never reaches a
safetensors output anyway: it is listed by `dropped_extras`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from sdtk.ops.components import is_known, junk_reason
from sdtk.ops.ema import is_ema_key
from sdtk.tensors import LazyTensor


@dataclass
class PruneResult:
    plan: List[LazyTensor]
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (key, reason)
    kept_unknown: List[str] = field(default_factory=list)


def prune_plan(plan: Sequence[LazyTensor], keep_ema: bool = False, keep_unknown: bool = False) -> PruneResult:
    out: List[LazyTensor] = []
    result = PruneResult(out)
    for t in plan:
        if is_ema_key(t.name):
            if keep_ema:
                out.append(t)
            else:
                result.dropped.append((t.name, "EMA copy of the UNet"))
            continue
        reason = junk_reason(t.name)
        if reason is not None:
            result.dropped.append((t.name, reason))
        elif is_known(t.name):
            out.append(t)
        elif keep_unknown:
            out.append(t)
            result.kept_unknown.append(t.name)
        else:
            result.dropped.append((t.name, "unknown key (pass --keep-unknown to keep it)"))
    return result


def dropped_extras(extras: Mapping[str, Any]) -> List[str]:
    """Top-level non-tensor entries of a pickled checkpoint (training state) a conversion leaves out."""
    return sorted({k.split(".")[0] for k in extras})


def summarize_dropped(dropped: Sequence[Tuple[str, str]]) -> Dict[str, int]:
    """{reason: count} for reports."""
    counts: Dict[str, int] = {}
    for _, reason in dropped:
        counts[reason] = counts.get(reason, 0) + 1
    return counts
