"""`convert --to gguf`: plan a GGUF file of a model's diffusion model the way city96's tools
would (sdtk.ops.gguf_rules), then stream it: each tensor is read, turned into f32, quantized
(C extension, else numpy) and written before the next is touched. Atomic, memory ~ one tensor.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from sdtk.errors import SdtkError, UsageError
from sdtk.formats.catalogue import Catalogue
from sdtk.formats.gguf import ORIG_SHAPE_PREFIX, GGUFOutTensor, GGUFValue, write_gguf
from sdtk.ops import gguf_rules as rules
from sdtk.quant.ggml_types import BY_NAME, FILE_TYPE, QUANT_VERSION
from sdtk.quant.quantize import quantize
from sdtk.tensors import LazyTensor

CHUNK_VALUES = 1 << 20  # a large tensor is cast and quantized in chunks of about this many values, on two threads


@dataclass
class GGUFPlan:
    arch: rules.Arch
    prefix: Optional[str]
    kv: Dict[str, GGUFValue]
    tensors: List[GGUFOutTensor]
    types: Dict[str, str] = field(default_factory=dict)  # name -> ggml type
    dropped: List[str] = field(default_factory=list)  # source keys outside the diffusion model
    notes: List[str] = field(default_factory=list)


def as_f32(arr: np.ndarray) -> np.ndarray:
    """Any float array as f32 (bf16 by a bit shift: exact and fast)."""
    if arr.dtype.name == "bfloat16":
        return (np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if arr.dtype == np.float16:
        from sdtk import fastcast

        return fastcast.astype(arr, np.float32)  # F16C when the C extension is built; numpy's bits
    return np.ascontiguousarray(arr, dtype=np.float32)


def _producer(t: LazyTensor, ggml: str, pool: Optional[ThreadPoolExecutor]):
    gt = BY_NAME[ggml]

    def produce() -> np.ndarray:
        arr = t.read()
        if ggml in ("F16", "BF16") and arr.dtype.name == ("float16" if ggml == "F16" else "bfloat16"):
            return np.ascontiguousarray(arr).view(np.uint8).reshape(-1)  # already stored so: copy bytes
        flat = np.ascontiguousarray(arr).reshape(-1)
        if pool is None or flat.size < 2 * CHUNK_VALUES or flat.size % gt.block:
            return quantize(as_f32(flat), gt)
        # cast + quantize chunk by chunk on the pool (numpy casts and the C quantizer release the GIL)
        step = CHUNK_VALUES // gt.block * gt.block
        out = np.empty(gt.row_bytes(flat.size) if gt.quantized else flat.size * gt.nbytes, dtype=np.uint8)
        per = (gt.nbytes * step // gt.block) if gt.quantized else step * gt.nbytes

        def one(start: int) -> None:
            chunk = quantize(as_f32(flat[start:start + step]), gt)
            first = start // step * per
            out[first:first + chunk.size] = chunk

        list(pool.map(one, range(0, flat.size, step)))
        return out

    return produce


def plan_gguf(cat: Catalogue, quant: str, pool: Optional[ThreadPoolExecutor] = None) -> GGUFPlan:
    """Which tensors, names, types, shapes and KVs the GGUF gets (raises UsageError/SdtkError)."""
    if quant not in rules.QUANT_BASE:
        raise UsageError(None, f"--quant {quant}: choose one of {', '.join(rules.QUANT_CHOICES)}")
    names = list(cat.tensors)
    prefix, mapping = rules.strip_prefix(names)
    try:
        arch = rules.detect_arch(mapping)
    except rules.ArchError as e:
        raise SdtkError(cat.path, f"cannot write GGUF: {e}") from None
    kept = set(mapping.values())
    plan = GGUFPlan(arch, prefix, {}, [], dropped=[n for n in names if n not in kept])
    too_long = [n for n in mapping if len(n) > rules.MAX_NAME_LENGTH]
    if too_long:
        raise SdtkError(cat.path, f"cannot write GGUF: tensor name longer than {rules.MAX_NAME_LENGTH} characters: {too_long[0]!r}")
    counts: Dict[str, int] = {}
    for t in cat.tensors.values():
        counts[t.dtype.name] = counts.get(t.dtype.name, 0) + 1
    main = max(counts, key=counts.get) if counts else "F16"
    stage_ftype = "BF16" if main == "BF16" else "F16"
    # KVs in the order city96's convert.py + llama-quantize leave them (orig_shape arrays follow)
    plan.kv["general.architecture"] = GGUFValue("STRING", arch.name)
    plan.kv["general.quantization_version"] = GGUFValue("UINT32", QUANT_VERSION)
    plan.kv["general.file_type"] = GGUFValue("UINT32", FILE_TYPE[quant])
    state = rules.QuantState()
    five_d = []
    for new_name, old_name in mapping.items():
        if any(s in new_name for s in arch.ignore):
            plan.dropped.append(old_name)
            continue
        t = cat.tensors[old_name]
        if not t.dtype.is_float:
            raise SdtkError(cat.path, f"cannot write GGUF: tensor {old_name!r} is {t.dtype.short}; GGUF image models hold float tensors only")
        shape = tuple(t.shape)
        ggml = rules.stage_type(arch, new_name, shape, t.dtype.name, quant if quant in ("F16", "BF16") else "")
        ne = tuple(reversed(shape)) if shape else (1,)
        if len(shape) > rules.MAX_DIMS:
            five_d.append(new_name)
            ggml = "F32"  # as city96's fix_5d_tensors.py appends them
        else:
            reshaped = rules.reshape_for_quant(arch, shape)
            if reshaped is not None:
                ne = tuple(reversed(reshaped))
                plan.kv[ORIG_SHAPE_PREFIX + new_name] = GGUFValue("ARRAY", [int(d) for d in shape], "INT32")
            qt = rules.quant_type(arch, new_name, ne, quant, state)
            ggml = qt or ggml
        plan.types[new_name] = ggml
        plan.tensors.append(GGUFOutTensor(new_name, ne, BY_NAME[ggml], _producer(t, ggml, pool)))
    if five_d:
        plan.notes.append(f"{len(five_d)} tensors have more than 4 dimensions ({five_d[0]}...); written F32 with their "
                          "full shape as city96's fix_5d_tensors.py does: ComfyUI-GGUF reads them, stock ggml does not")
    if plan.dropped:
        plan.notes.append(f"left out {len(plan.dropped)} tensors outside the diffusion model (text encoders, VAE...): "
                          "GGUF files hold the diffusion model alone, as city96's converter writes them")
    if stage_ftype == "BF16" and quant == "F16":
        plan.notes.append("bf16 weights written as F16 (--quant F16); --quant BF16 keeps them exact")
    return plan


def gguf_summary(plan: GGUFPlan) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for ggml in plan.types.values():
        out[ggml] = out.get(ggml, 0) + 1
    return dict(sorted(out.items()))


def convert_to_gguf(cat: Catalogue, quant: str, dest: Path, *, overwrite: bool = False, inputs=(), on_tensor=None,
                    threads: int = 2, on_start=None) -> Tuple[GGUFPlan, int]:
    """Plan and write `dest`. Returns (plan, bytes written). `on_start(total)`: once planned, the
    bytes `on_tensor(t, done)` counts up to (the header, then each tensor padded to the alignment)."""
    if dest.suffix.lower() != ".gguf":
        raise UsageError(dest, "a GGUF output is named *.gguf")
    from sdtk.formats.gguf import DEFAULT_ALIGNMENT, gguf_header

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        plan = plan_gguf(cat, quant, pool if threads > 1 else None)
        if on_start is not None:
            try:
                header, _ = gguf_header(plan.kv, plan.tensors, DEFAULT_ALIGNMENT)
            except ValueError:  # write_gguf says what is wrong
                header = b""
            on_start(len(header) + sum(t.nbytes + (-t.nbytes) % DEFAULT_ALIGNMENT for t in plan.tensors))
        written = write_gguf(dest, plan.kv, plan.tensors, inputs=inputs, overwrite=overwrite, on_tensor=on_tensor)
    return plan, written


def default_gguf_name(source: Path, quant: str, folder: Optional[Path] = None) -> Path:
    stem = source.stem
    return (folder or source.parent) / f"{stem}-{quant}.gguf"


def convert_file_to_gguf(source: Path, quant: str, output: Optional[Path] = None, out_folder: Optional[Path] = None,
                         overwrite: bool = False, progress=None) -> dict:
    """The `sdtk convert IN --to gguf --quant Q` pipeline; returns the JSON summary convert prints."""
    from sdtk.formats import open_model
    from sdtk.quant.views import dequantize_catalogue

    with open_model(source) as cat:
        dequantize_catalogue(cat)  # an fp8-scaled or NF4 input: its values
        dest = output if (output is not None and not output.is_dir()) else default_gguf_name(
            source, quant, output if (output is not None and output.is_dir()) else out_folder)
        try:
            plan, written = convert_to_gguf(cat, quant, dest, overwrite=overwrite, inputs=[cat.path],
                                            on_tensor=(lambda t, done: progress.advance(done)) if progress else None,
                                            on_start=(lambda total: progress.start(dest, total)) if progress else None)
        finally:
            if progress is not None:
                progress.done()
    types = gguf_summary(plan)
    return {
        "input": str(source), "architecture": plan.arch.name, "prediction_type": None, "weight_set": None,
        "operations": [f"gguf {quant} ({', '.join(f'{n} {k}' for k, n in types.items())})"],
        "outputs": [{"part": "diffusion-model", "path": str(dest), "tensors": len(plan.tensors), "bytes": written,
                     "sidecar": None, "ggml_types": types}],
        "dropped": [{"key": k, "reason": "not part of the diffusion model"} for k in plan.dropped],
        "dropped_training_state": [], "overflow": {}, "sidecar": None, "notes": plan.notes,
        "source_hashes": "skipped", "input_replaced": False,
    }
