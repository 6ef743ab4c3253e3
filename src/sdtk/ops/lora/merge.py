"""`lora merge`: several LoRAs into one, exactly, by concatenating ranks.

kohya's merge_lora.py sums the factors of LoRAs of equal rank tensor by tensor, which adds cross
terms U_i D_j and squares every ratio (sd-scripts #868); its `--concat` keeps alpha while the rank
grows. Exact instead (reference/lora.md §3.1): with c_i = w_i * alpha_i / r_i, down_i * sqrt|c_i|
and up_i * sign(c_i) sqrt|c_i| concatenated along the rank, alpha = the total rank (scale 1), so
applying the result equals applying each input at its weight: sum_i w_i s_i U_i D_i.
Only LoRA / LoCon modules (no Tucker mid, no DoRA: DoRA is not linear) can be concatenated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.errors import SdtkError
from sdtk.formats import open_model
from sdtk.formats.safetensors import write_safetensors
from sdtk.ops.lora.adapters import read_adapter
from sdtk.ops.lora.patch import module_scale
from sdtk.tensors import LazyTensor, dtype as dtype_named

F32 = np.float32


@dataclass
class MergeSummary:
    output: str
    modules: int
    ranks: Dict[int, int]  # total rank -> modules
    inputs: List[Tuple[str, float]]


def concat_merge(inputs: Sequence[Tuple[str, float]], dest: str, overwrite: bool = False,
                 out_dtype: Optional[str] = None, on_start=None, on_tensor=None) -> MergeSummary:
    """Write the exact rank-concatenated merge of `inputs` ((path, weight), ...) to `dest`.
    `on_start(plan)` before writing, `on_tensor(t, bytes_done)` after each tensor (progress; an
    exception raised there unwinds the writer: no partial file)."""
    cats = []
    try:
        adapters = []
        for path, weight in inputs:
            cat = open_model(path)
            cats.append(cat)
            adapter = read_adapter(cat.tensors, cat.metadata)
            for name, m in adapter.modules.items():
                if m.kind not in ("lora", "locon") or "mid" in m.parts or m.dora:
                    what = "DoRA" if m.dora else ("Tucker LoCon" if "mid" in m.parts else m.kind)
                    raise SdtkError(path, f"module {name} is {what}: only LoRA/LoCon modules can be merged exactly by concatenation")
            if adapter.unknown:
                raise SdtkError(path, f"holds tensors that are not LoRA factors (e.g. {adapter.unknown[0]})")
            adapters.append((adapter, weight, path))
        widest = max((t.dtype for c in cats for t in c.tensors.values() if t.dtype.is_float), key=lambda d: d.itemsize)
        dt = dtype_named(out_dtype) if out_dtype else widest
        names: List[str] = []
        for adapter, _, _ in adapters:
            names += [n for n in adapter.modules if n not in names]
        plan: List[LazyTensor] = []
        ranks: Dict[int, int] = {}
        for name in names:
            parts = [(a.modules[name], w, a.peft_config, p) for a, w, p in adapters if name in a.modules]
            shapes = {(tuple(m.parts["up"].shape[:1]) + tuple(m.parts["down"].shape[1:])) for m, _, _, _ in parts}
            if len(shapes) > 1:
                raise SdtkError(parts[1][3], f"module {name} has shape {sorted(shapes)[1]} but {sorted(shapes)[0]} in another input")
            total = sum(m.parts["down"].shape[0] for m, _, _, _ in parts)
            ranks[total] = ranks.get(total, 0) + 1
            up_key, down_key = _keys(name, parts[0][0])
            down_shape = (total,) + tuple(parts[0][0].parts["down"].shape[1:])
            up_shape = (parts[0][0].parts["up"].shape[0], total) + tuple(parts[0][0].parts["up"].shape[2:])

            def down_loader(parts=parts):
                return np.concatenate([np.asarray(m.parts["down"].read(), F32) * F32(np.sqrt(abs(w * module_scale(m, peft))))
                                       for m, w, peft, _ in parts], axis=0).astype(dt.numpy)

            def up_loader(parts=parts):
                return np.concatenate([np.asarray(m.parts["up"].read(), F32) * F32(np.sign(w * module_scale(m, peft)) * np.sqrt(abs(w * module_scale(m, peft))))
                                       for m, w, peft, _ in parts], axis=1).astype(dt.numpy)

            alpha = np.array(total, dtype=dt.numpy)
            plan += [LazyTensor(down_key, dt, down_shape, down_loader), LazyTensor(up_key, dt, up_shape, up_loader),
                     LazyTensor(name + ".alpha", dt, (), lambda a=alpha: a)]
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
                "ss_network_alpha": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
                "sdtk.lora_merge": ", ".join(f"{os.path.basename(p)}:{w:g}" for p, w in inputs)}
        for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation"):
            if key in cats[0].metadata:
                meta[key] = cats[0].metadata[key]
        if on_start is not None:
            on_start(plan)
        write_safetensors(dest, plan, meta, inputs=[p for p, _ in inputs], overwrite=overwrite, on_tensor=on_tensor)
        return MergeSummary(os.fspath(dest), len(names), ranks, list(inputs))
    finally:
        for c in cats:
            c.close()


def _keys(name: str, m) -> Tuple[str, str]:
    """kohya suffixes for the output (`.lora_up.weight` / `.lora_down.weight`)."""
    return name + ".lora_up.weight", name + ".lora_down.weight"
