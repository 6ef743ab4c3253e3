"""`convert --to diffusers` (single file -> folder) and `convert FOLDER` (folder -> single file),
over the ordinary convert pipeline: the same options (precision, EMA, pruning, CLIP fixes, VAE
baking) shape the tensors first, then they are mapped and written."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Optional, Tuple

from sdtk.errors import UsageError
from sdtk.fileio import all_or_nothing
from sdtk.formats import open_model
from sdtk.formats.diffusers import is_diffusers_folder
from sdtk.formats.safetensors import write_safetensors
from sdtk.ops.convert import (ConvertOptions, OverflowRefused, Progress, choose_destinations, plan_conversion,
                              resolve_options, write_outputs)
from sdtk.ops.diffusers.write import VARIANTS, plan_folder, write_folder


def default_folder(source: Path) -> Path:
    return source.with_suffix("") if source.suffix else source.with_name(source.name + "-diffusers")


def to_diffusers(source: Path, opts: ConvertOptions, output: Optional[Path] = None, *, variant: Optional[str] = None,
                 tokenizers: Optional[str] = None, progress: Progress = Progress()) -> dict:
    """Write `source` (a single file) as a diffusers folder; returns the JSON summary."""
    if opts.extract or opts.replace_input:
        raise UsageError(None, "--to diffusers writes one folder; it cannot be combined with --extract or --replace-input")
    if variant is not None and variant not in VARIANTS:
        raise UsageError(None, f"--variant {variant}: choose one of {', '.join(VARIANTS)}")
    if variant and not (opts.dtype or opts.unet_dtype or opts.vae_dtype or opts.te_dtype) and variant != "fp32":
        opts = resolve_options(replace(opts, dtype=variant))  # a variant's files hold that precision
    dest = Path(output) if output is not None else default_folder(source)
    with contextlib.ExitStack() as stack:
        cat = stack.enter_context(open_model(source))
        conv = plan_conversion(cat, opts, stack)
        plan = conv.outputs[0].plan
        fplan = plan_folder(plan, architecture=conv.facts.architecture, source=source, metadata=cat.metadata,
                            prediction=conv.prediction_type, variant=variant, tokenizers=tokenizers)

        def advance(done: int) -> None:
            if conv.overflow.total and not opts.allow_overflow:
                name, n = next(iter(conv.overflow.by_tensor.items()))
                raise OverflowRefused(cat.path, f"casting would overflow: {n} values of {name} would become inf/NaN; "
                                                "use --dtype bf16 or pass --allow-overflow")
            progress.advance(done)

        try:
            written = write_folder(fplan, dest, inputs=[cat.path, *conv.extra_inputs], overwrite=opts.overwrite,
                                   on_start=progress.start, on_advance=advance)
        finally:
            progress.done()
    return {"input": str(source), "output": str(dest), "to": "diffusers", "architecture": conv.facts.architecture,
            "pipeline": fplan.pipeline, "prediction_type": conv.prediction_type, "variant": variant,
            "components": fplan.components, "sidecar_tensors": fplan.sidecar_tensors, "bytes": written,
            "operations": conv.operations, "notes": conv.notes + fplan.notes}


def default_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".safetensors")


def from_diffusers(folder: Path, opts: ConvertOptions, output: Optional[Path] = None,
                   progress: Progress = Progress()) -> dict:
    """Write a diffusers folder as the single file A1111/ComfyUI load; returns the JSON summary.
    With no other option the sidecar's tensors, order and metadata are restored as they were."""
    if opts.extract or opts.replace_input:
        raise UsageError(None, "converting a diffusers folder writes one file; drop --extract / --replace-input")
    dest = Path(output) if output is not None else default_file(folder)
    with contextlib.ExitStack() as stack:
        cat = stack.enter_context(open_model(folder))
        inputs = [folder]
        if not opts.does_anything and not opts.prediction_type:
            if dest.suffix.lower() != ".safetensors":
                raise UsageError(dest, "sdtk writes .safetensors files only; name the output *.safetensors")
            plan = list(cat.tensors.values())
            progress.start(dest, sum(t.nbytes for t in plan))
            try:
                written = write_safetensors(dest, plan, cat.metadata or None, inputs=inputs, overwrite=opts.overwrite,
                                            on_tensor=lambda t, n: progress.advance(n))
            finally:
                progress.done()
            return {"input": str(folder), "output": str(dest), "from": "diffusers", "tensors": len(plan),
                    "bytes": written, "operations": [], "notes": list(cat.notes)}
        opts = replace(opts, source_hashes=False)  # a folder has no file hash for the lineage record
        conv = plan_conversion(cat, opts, stack)
        choose_destinations(conv, dest, None, opts)
        with all_or_nothing():  # the file and its yaml (v-prediction) appear together, or neither
            write_outputs(cat, conv, opts, progress)
        out = conv.outputs[0]
        return {"input": str(folder), "output": str(out.dest), "from": "diffusers", "tensors": len(out.plan),
                "bytes": out.bytes_written, "operations": conv.operations, "notes": list(cat.notes) + conv.notes}


def is_folder_source(path: Path) -> bool:
    return is_diffusers_folder(path)
