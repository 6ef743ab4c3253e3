"""Writing a computed plan (a merge, a baked LoRA) as a quantized file: `--to gguf --quant Q`
(city96's choices, sdtk.ops.to_gguf) or `--to fp8-scaled` (ComfyUI's per-layer form,
sdtk.quant.fp8_scaled), besides plain safetensors. The plan's tensors are computed, quantized
and written one at a time (streaming, atomic), exactly as `convert --to` does for a file."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from sdtk.errors import UsageError
from sdtk.tensors import LazyTensor

TARGETS = ("safetensors", "gguf", "fp8-scaled")
SUFFIX = {"safetensors": ".safetensors", "gguf": ".gguf", "fp8-scaled": ".safetensors"}


@dataclass
class Written:
    bytes: int
    tensors: int
    to: str
    quant: Optional[str] = None
    types: Dict[str, int] = field(default_factory=dict)  # GGUF: ggml type -> tensors
    fp8_layers: int = 0
    notes: List[str] = field(default_factory=list)


def check_target(to: Optional[str], quant: Optional[str], dest) -> str:
    """The target (default safetensors); refuses bad combinations before any work."""
    from sdtk.ops import gguf_rules

    to = to or "safetensors"
    if to not in TARGETS:
        raise UsageError(None, f"--to {to}: choose one of {', '.join(TARGETS)}")
    if to == "gguf":
        if not quant:
            raise UsageError(None, f"--to gguf needs --quant ({', '.join(gguf_rules.QUANT_CHOICES)})")
        if quant not in gguf_rules.QUANT_BASE:
            raise UsageError(None, f"--quant {quant}: choose one of {', '.join(gguf_rules.QUANT_CHOICES)}")
    elif quant:
        raise UsageError(None, "--quant goes with --to gguf")
    if dest is not None and not str(dest).lower().endswith(SUFFIX[to]):
        raise UsageError(dest, f"a --to {to} output is a *{SUFFIX[to]} file")
    return to


def in_diffusion_model(names: Sequence[str]) -> Callable[[str], bool]:
    """Which names belong to the diffusion model (the ones fp8-scaled quantizes)."""
    from sdtk.ops.gguf_rules import strip_prefix

    prefix, _ = strip_prefix(list(names))
    if prefix in ("model.diffusion_model.", "model."):
        return lambda name: name.startswith(prefix)
    return lambda name: True


def write_plan(plan: Sequence[LazyTensor], dest, to: str, quant: Optional[str], metadata: Dict[str, str], *,
               inputs=(), overwrite: bool = False, on_tensor=None, final_metadata=None, label: Optional[str] = None,
               threads: int = 2) -> Written:
    """Write `plan` to `dest` as `to`. GGUF files carry city96's KVs only (no safetensors metadata:
    ComfyUI-GGUF and stable-diffusion.cpp read none), so `metadata` goes to safetensors outputs."""
    from sdtk.formats.safetensors import write_safetensors

    plan = list(plan)
    if to == "gguf":
        from sdtk.formats.catalogue import Catalogue
        from sdtk.formats.gguf import write_gguf
        from sdtk.ops.to_gguf import gguf_summary, plan_gguf

        cat = Catalogue(label or os.fspath(dest), "plan", {t.name: t for t in plan})
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            gp = plan_gguf(cat, quant, pool if threads > 1 else None)
            n = write_gguf(dest, gp.kv, gp.tensors, inputs=inputs, overwrite=overwrite, on_tensor=on_tensor)
        notes = list(gp.notes) + ["GGUF output: the safetensors metadata (recipe, lineage) is not carried"]
        return Written(n, len(gp.tensors), to, quant, gguf_summary(gp), notes=notes)
    layers = 0
    if to == "fp8-scaled":
        from sdtk.ops.to_fp8_scaled import scaled_plan

        plan, layers = scaled_plan(plan, in_diffusion_model([t.name for t in plan]))
    n = write_safetensors(dest, plan, metadata, inputs=inputs, overwrite=overwrite, on_tensor=on_tensor,
                          final_metadata=final_metadata)
    return Written(n, len(plan), to, fp8_layers=layers)
