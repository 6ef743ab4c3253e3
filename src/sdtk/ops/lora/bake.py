"""`lora apply` end to end: open, plan, refuse or write, with the lineage record."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sdtk.version import __version__
from sdtk.architectures.lora_keys import build_alias_table
from sdtk.errors import SdtkError, UsageError
from sdtk.fileio import check_output_path
from sdtk.formats import open_model
from sdtk.ops.lineage import LINEAGE_KEY, lineage_value, with_output_hash
from sdtk.adapters.reading import read_adapter
from sdtk.adapters.matching import LoraInput, LoraReport, check_reports, plan_patches
from sdtk.ops.lora.apply import ApplyStats, apply_plan, check_finite_adapters, lora_file_facts

DORA_CONVENTIONS = ("comfyui", "lycoris")


@dataclass
class BakeResult:
    output: Optional[str]
    base: str
    base_title: str
    bytes: int
    tensors: int
    computed: int
    copied: int
    loras: List[LoraReport]
    overflow: Dict[str, int] = field(default_factory=dict)
    dequantized: Dict[str, int] = field(default_factory=dict)  # source format -> weights read dequantized
    dequantized_dtype: Optional[str] = None  # what those were written as (before any --to)
    to: str = "safetensors"
    quant: Optional[str] = None
    ggml_types: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"output": self.output, "base": self.base, "base_architecture": self.base_title, "bytes": self.bytes,
                "tensors": self.tensors, "computed": self.computed, "copied": self.copied,
                "overflow": self.overflow, "loras": [r.as_dict() for r in self.loras],
                "dequantized": self.dequantized, "dequantized_dtype": self.dequantized_dtype, "to": self.to,
                "quant": self.quant, "ggml_types": self.ggml_types, "notes": self.notes}


class _Lineage:
    """One `sdtk.lineage` step: the base, and each LoRA with its name, hashes and strengths."""

    def __init__(self, base: str, size: int, loras: List[dict], dora_convention: str):
        self.base, self.size, self.loras, self.dora = base, size, loras, dora_convention

    def as_dict(self) -> dict:
        ops = [f"lora apply {l['file']} strength {l['strength']} te {l['te_strength']}"
               + (f" lbw {','.join(f'{b}={v:g}' for b, v in l['block_weights'].items())}" if l.get("block_weights") else "")
               for l in self.loras]
        return {"tool": f"sdtk {__version__}", "source": self.base, "source_size": self.size,
                "operations": ops, "loras": self.loras, "dora_convention": self.dora}


def bake(base_path: str, loras: Sequence[LoraInput], dest: Optional[str], *, allow_unmatched: bool = False,
         overwrite: bool = False, dora_convention: str = "comfyui", dry_run: bool = False,
         on_start: Optional[Callable] = None, on_tensor: Optional[Callable] = None, dtype: Optional[str] = None,
         to: Optional[str] = None, quant: Optional[str] = None) -> BakeResult:
    """Bake `loras` into `base_path` and write `dest` (nothing written when refused or dry_run).
    A quantized base (GGUF, fp8-scaled, NF4/FP4) is read dequantized; its quantized weights are
    written in `dtype` (default: the dtype of the base's unquantized weights, usually bf16), or
    the whole result is quantized again with `to` ("gguf" with `quant`, or "fp8-scaled")."""
    from sdtk.ops.merge.arch import describe
    from sdtk.ops.quantized_output import check_target, write_plan
    from sdtk.quant import views

    if dora_convention not in DORA_CONVENTIONS:
        raise UsageError(None, f"--dora must be one of {', '.join(DORA_CONVENTIONS)}")
    if not loras:
        raise UsageError(None, "give at least one LoRA")
    for spec in loras:
        if not os.path.exists(spec.path):
            raise SdtkError(spec.path, "no such file")
    if not os.path.exists(base_path):
        raise SdtkError(base_path, "no such file")
    to = check_target(to, quant, dest if not dry_run else None)
    if dest is not None and not dry_run:
        check_output_path(dest, [base_path] + [s.path for s in loras], overwrite)
    cats = []
    try:
        base = views.dequantize_catalogue(open_model(base_path))
        cats.append(base)
        # dequantized weights: written in --dtype, else the base's own float dtype; quantized again
        # (--to) straight from their f32 values unless --dtype is given
        out_dtype = views.output_dtype(base, dtype) if (to == "safetensors" or dtype) else None
        out_dtypes = {k: out_dtype for k in base.dequantized if out_dtype and base.tensors[k].dtype != out_dtype}
        deq_dtype = (out_dtype.short if out_dtype else "fp32") if base.dequantized else None
        _, base_title = describe(base)
        shapes = {k: tuple(t.shape) for k, t in base.tensors.items()}
        table = build_alias_table(shapes)
        adapters = []
        for spec in loras:
            cat = open_model(spec.path)
            cats.append(cat)
            adapters.append((spec, read_adapter(cat.tensors, cat.metadata)))
        patches, reports = plan_patches(shapes, adapters, table)
        for rep, cat in zip(reports, cats[1:]):
            rep.base_guess = _lora_base_label(cat)
        check_reports(reports, f"{os.path.basename(base_path)} ({base_title})", allow_unmatched)
        check_finite_adapters(adapters, patches)
        stats = ApplyStats()
        plan = apply_plan(base, patches, [a.peft_config for _, a in adapters], [s.path for s in loras], dora_convention, stats,
                          out_dtypes=out_dtypes)
        if dry_run or dest is None:
            return BakeResult(None, base_path, base_title, 0, len(plan), stats.computed, stats.copied, reports,
                              dequantized=views.summary(base), dequantized_dtype=deq_dtype, to=to,
                              quant=quant)
        for rep in reports:
            rep.hashes = lora_file_facts(rep.file)
        lineage = _Lineage(os.path.basename(os.path.normpath(base_path)), _input_size(base_path),
                           [{"file": os.path.basename(r.file), "sha256": r.hashes["sha256"], "autov3": r.hashes["autov3"],
                             "strength": r.strength, "te_strength": r.te_strength, "matched": r.matched,
                             "modules": r.modules, **({"block_weights": r.block_weights} if r.block_weights else {})}
                            for r in reports], dora_convention)
        meta = with_output_hash(dict(base.metadata), None)
        meta[LINEAGE_KEY] = lineage_value(base.metadata.get(LINEAGE_KEY), lineage)
        if on_start is not None:
            on_start(plan)
        from sdtk import blas
        from sdtk.ops.prefetch import Prefetcher

        # the next changed tensors are computed while this one is written, one per core, each on
        # one BLAS thread (thin products: OpenBLAS's own threads mostly spin, see sdtk.blas);
        # safetensors: every tensor is read in order
        with blas.limited(1, with_scipy=False):
            ahead = Prefetcher(plan if to == "safetensors" else [], depth=3, workers=_cores())
            try:
                written = write_plan(ahead.plan if to == "safetensors" else plan, dest, to, quant, meta, overwrite=overwrite,
                                     inputs=[base_path] + [s.path for s in loras], on_tensor=on_tensor, label=base_path)
            finally:
                ahead.close()
        return BakeResult(os.fspath(dest), base_path, base_title, written.bytes, written.tensors, stats.computed, stats.copied,
                          reports, dict(stats.overflow), views.summary(base), deq_dtype, to, quant,
                          written.types, written.notes)
    finally:
        for c in cats:
            c.close()


def _input_size(path) -> int:
    from sdtk.formats.diffusers import folder_size, is_diffusers_folder

    return folder_size(path) if is_diffusers_folder(path) else os.path.getsize(path)


def _cores() -> int:
    """Tensors computed at once: the cores this process may use, at most 2 (memory: each is a
    float32 working copy of a weight and its adapter's product, up to ~120 MB on SDXL)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, n))


def _lora_base_label(cat) -> Optional[str]:
    """"SDXL", "SD1" ... as the LoRA's keys, shapes or metadata say (identify's adapter analysis)."""
    try:
        from sdtk.identify.adapters import analyse_lora

        info = analyse_lora(cat.tensors, "lora", cat.metadata)
        arch = info.get("base_architecture")
    except Exception:  # a label for messages only
        return None
    return ARCH_LABELS.get(arch, arch) if arch else None


# ModelSpec architecture ids -> short names in messages. Source: kohya library/sai_model_spec.py.
ARCH_LABELS = {
    "stable-diffusion-v1": "SD1", "stable-diffusion-v2-512": "SD2", "stable-diffusion-v2-768-v": "SD2",
    "stable-diffusion-v2": "SD2", "stable-diffusion-xl-v1-base": "SDXL", "flux-1-dev": "FLUX.1", "flux-1-schnell": "FLUX.1",
    "stable-diffusion-3-medium": "SD3", "stable-diffusion-3": "SD3", "stable-diffusion-v3-medium": "SD3",
    "stable-diffusion-xl-v1-refiner": "SDXL refiner",
}


def match_lora(lora_path: str, base_path: str) -> Tuple[LoraReport, str]:
    """How a LoRA fits a base (for `inspect --base`): its report (matched / unmatched with why)
    and the base's title; nothing is written, only names, shapes and alphas are read."""
    from sdtk.ops.merge.arch import describe

    from sdtk.quant.views import dequantize_catalogue

    with open_model(base_path) as base, open_model(lora_path) as cat:
        dequantize_catalogue(base)  # NF4 weights: their real shapes (only the quant states are read)
        _, title = describe(base)
        shapes = {k: tuple(t.shape) for k, t in base.tensors.items()}
        _, reports = plan_patches(shapes, [(LoraInput(lora_path), read_adapter(cat.tensors, cat.metadata))])
        reports[0].base_guess = _lora_base_label(cat)
    return reports[0], title
