"""A single file's plan -> a diffusers folder that loads offline (every config generated, no hub),
streamed tensor by tensor and atomic as a whole (built in a temporary folder beside the
destination, fsynced, renamed into place).

The folder: model_index.json, one subfolder per component (config.json + weights), tokenizers
(CLIP from shipped data; T5 copied from --tokenizers), scheduler/scheduler_config.json, and
`sdtk_extra.safetensors`: every tensor diffusers does not keep plus the original key order and
metadata, so `sdtk convert FOLDER` gives the original file back bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from sdtk.architectures.diffusers_keys import components as rows
from sdtk.architectures.diffusers_keys.assemble import ComponentError, split_single_file
from sdtk.architectures.diffusers_keys.pipelines import PIPELINES, scheduler_config
from sdtk.architectures.registry import family_of
from sdtk.errors import OutputError, SdtkError, UsageError
from sdtk.fileio import (TEMP_SUFFIX, _fsync_dir, _umask, os_error_to_output_error, signals_held,
                         unwind_on_termination)  # one atomic-write toolkit
from sdtk.formats.diffusers import SIDECAR, SIDECAR_KEY
from sdtk.formats.safetensors import write_safetensors
from sdtk.ops.diffusers import tokenizers as tok
from sdtk.tensors import LazyTensor

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the written folders are tested with
VARIANTS = ("fp16", "bf16", "fp32")
# Families with no single-file <-> diffusers layout in sdtk yet, and what to do instead.
NO_LAYOUT_ADVICE = ("convert it to safetensors (`sdtk convert FILE`) or extract its parts (`--extract`); "
                    "diffusers layouts exist for SD1.x, SD2.x, SDXL (base, refiner, inpainting), SD3/3.5, FLUX.1, Qwen-Image, Lumina-Image 2.0, Z-Image")


@dataclass
class FolderFile:
    relpath: str
    tensors: Optional[List[LazyTensor]] = None  # a safetensors file
    metadata: Optional[Dict[str, str]] = None
    data: Optional[bytes] = None  # a small file
    copy_from: Optional[str] = None


@dataclass
class FolderPlan:
    family: str
    pipeline: str
    files: List[FolderFile]
    components: Dict[str, int]  # folder -> tensor count
    notes: List[str] = field(default_factory=list)
    sidecar_tensors: int = 0

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for f in self.files if f.tensors for t in f.tensors)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _torch_dtype(tensors: Sequence[LazyTensor]) -> str:
    by: Dict[str, int] = {}
    for t in tensors:
        if t.dtype.is_float:
            by[t.dtype.torch_name] = by.get(t.dtype.torch_name, 0) + t.nbytes
    return max(by, key=by.get) if by else "float32"


def diffusers_family(architecture: Optional[str], path, keys=()) -> str:
    family = family_of(architecture or "unknown")
    if family == "lumina2":  # Lumina-2 and Z-Image share a family; Z-Image's blocks modulate through adaLN_modulation.0
        family = "z-image" if any(k.endswith("layers.0.adaLN_modulation.0.weight") for k in keys) else "lumina2"
    if family not in PIPELINES:
        what = architecture or "an unidentified model"
        raise UsageError(path, f"{what} has no diffusers layout in sdtk; {NO_LAYOUT_ADVICE}")
    return family


def plan_folder(plan: Sequence[LazyTensor], *, architecture: Optional[str], source, metadata: Mapping[str, str],
                prediction: Optional[str], variant: Optional[str] = None, tokenizers: Optional[str] = None) -> FolderPlan:
    """Plan every file of the folder (nothing is read yet)."""
    tensors = {t.name: t for t in plan}
    family = diffusers_family(architecture, source, tensors)
    try:
        split = split_single_file(tensors, family)
    except ComponentError as e:
        raise SdtkError(source, f"cannot write a diffusers folder: {e.component}: {e.problem}") from None
    spec = split.pipeline
    if not split.components:
        raise SdtkError(source, f"holds none of the components of a {spec.pipeline} folder")
    tag = f".{variant}" if variant else ""
    unet = next((c for c in split.components if c.spec.kind == "unet"), None)
    inpainting = unet is not None and unet.single_shapes["input_blocks.0.0.weight"][1] == 9 and spec.inpainting_pipeline
    pipeline = spec.inpainting_pipeline if inpainting else spec.pipeline
    zero_snr = "ztsnr" in tensors
    files: List[FolderFile] = []
    index: Dict = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION}
    counts: Dict[str, int] = {}
    notes: List[str] = []
    for comp in split.components:
        options = dict(comp.spec.options)
        if comp.spec.kind == "unet":
            if family == "sd2":
                options["sample_size"] = 96 if prediction == "v" else 64  # SD2.1 768-v / 512-base (reference 2.2)
                options["upcast_attention"] = prediction == "v"
        if comp.spec.kind == "vae" and family == "sd2" and prediction != "v":
            options["vae_sample_size"] = 512
        config = rows.config_for(comp.spec.kind, comp.single_shapes, comp.shapes, family, options, _torch_dtype(comp.tensors))
        if comp.spec.library == "diffusers":
            config = {"_class_name": comp.spec.cls, "_diffusers_version": DIFFUSERS_VERSION,
                      **{k: v for k, v in config.items() if k != "_class_name"}}
        files.append(FolderFile(f"{comp.spec.folder}/config.json", data=_json_bytes(config)))
        files.append(FolderFile(f"{comp.spec.folder}/{comp.spec.weight_stem}{tag}.safetensors", tensors=comp.tensors,
                                metadata={"format": "pt"}))
        index[comp.spec.folder] = [comp.spec.library, comp.spec.cls]
        counts[comp.spec.folder] = len(comp.tensors)
        for name in comp.created:
            notes.append(f"{comp.spec.folder}: created {name} (identity, as diffusers does; dropped again on the way back)")
    for folder in split.absent:
        index[folder] = [None, None]
    present = {c.spec.folder for c in split.components}
    for t in spec.tokenizers:
        if t.for_encoder not in present:
            index[t.folder] = [None, None]
            continue
        if t.kind == "clip":
            for name, data in tok.clip_tokenizer_files(t.pad).items():
                files.append(FolderFile(f"{t.folder}/{name}", data=data))
            index[t.folder] = ["transformers", "CLIPTokenizer"]
        else:
            src = tok.find_t5_tokenizer(tokenizers, t.folder)
            if src is None:
                index[t.folder] = [None, None]
                notes.append(f"{t.folder}: no T5 tokenizer written (sdtk cannot ship one); pass --tokenizers FOLDER "
                             f"(a folder with a T5 tokenizer.json/spiece.model), or give `{t.folder}=` when loading")
            else:
                for name in tok.T5_FILES:
                    if os.path.isfile(os.path.join(src, name)):
                        files.append(FolderFile(f"{t.folder}/{name}", copy_from=os.path.join(src, name)))
                index[t.folder] = ["transformers", "T5TokenizerFast"]
    sched = scheduler_config(spec, prediction, zero_snr, schnell=(architecture == "flux-1-schnell"))
    files.append(FolderFile("scheduler/scheduler_config.json",
                            data=_json_bytes({**sched, "_diffusers_version": DIFFUSERS_VERSION})))
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    for key, value in spec.flags.items():
        index.setdefault(key, value)
    files.append(FolderFile("model_index.json", data=_json_bytes(index)))
    info = {"version": 1, "source": Path(source).name, "order": list(tensors), "metadata": dict(metadata),
            "prefixes": {c.spec.folder: c.prefix for c in split.components},
            "created": {c.spec.folder: c.created for c in split.components if c.created}}
    files.append(FolderFile(SIDECAR, tensors=split.extra, metadata={SIDECAR_KEY: json.dumps(info, separators=(",", ":"))}))
    if split.extra:
        notes.append(f"{len(split.extra)} tensors diffusers does not keep are in {SIDECAR} (ignored by diffusers; "
                     "restored by `sdtk convert FOLDER`): " + _summarize(t.name for t in split.extra))
    if split.absent:
        notes.append(f"not in the file: {', '.join(split.absent)} (written as null in model_index.json; "
                     "pass them when loading, e.g. from_pretrained(folder, vae=...))")
    if prediction == "v" or zero_snr:
        notes.append(f"scheduler: {sched.get('prediction_type')}" + (", zero terminal SNR (trailing spacing)" if zero_snr else ""))
    return FolderPlan(family, pipeline, files, counts, notes, len(split.extra))


def _summarize(names) -> str:
    groups: Dict[str, int] = {}
    for n in names:
        head = n.split(".")[0] if not n.startswith(("model.", "model_ema.", "cond_stage_model.", "conditioner.", "text_encoders.")) else ".".join(n.split(".")[:2])
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{k} ({v})" if v > 1 else k for k, v in list(groups.items())[:10]) + (", ..." if len(groups) > 10 else "")


def check_folder_output(dest: Path, inputs: Sequence, overwrite: bool) -> None:
    for src in inputs:
        if src is not None and os.path.abspath(src) == os.path.abspath(dest):
            raise OutputError(dest, "is one of the inputs; sdtk never writes over an input")
    if dest.exists() and not dest.is_dir():
        raise OutputError(dest, "exists and is not a folder")
    if dest.exists() and not overwrite:
        raise OutputError(dest, "already exists; pass --overwrite to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(dest, f"folder {parent} does not exist")


def write_folder(fplan: FolderPlan, dest: Path, *, inputs: Sequence = (), overwrite: bool = False,
                 on_start: Callable[[Path, int], None] = lambda d, n: None,
                 on_advance: Callable[[int], None] = lambda n: None) -> int:
    """Write the planned folder atomically; returns the tensor bytes written."""
    dest = Path(dest)
    check_folder_output(dest, inputs, overwrite)
    with unwind_on_termination():  # a `kill` between two files still removes the temporary folder
        return _write_folder(fplan, dest, inputs, on_start, on_advance)


def _write_folder(fplan: FolderPlan, dest: Path, inputs: Sequence, on_start, on_advance) -> int:
    parent = str(dest.parent) or "."
    temp = None
    try:
        with signals_held():  # the new folder is ours to remove before Ctrl-C can land
            try:
                temp = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=TEMP_SUFFIX, dir=parent)
            except OSError as e:
                raise OutputError(dest, f"cannot create a folder in {parent}: {e.strerror}") from None
    except BaseException:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    done = 0
    on_start(dest, fplan.tensor_bytes)
    try:
        for f in fplan.files:
            path = os.path.join(temp, f.relpath)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if f.tensors is not None:
                base = done
                write_safetensors(path, f.tensors, f.metadata, inputs=inputs,
                                  on_tensor=lambda t, n, base=base: on_advance(base + n))
                done += sum(t.nbytes for t in f.tensors)
            else:
                data = f.data if f.data is not None else Path(f.copy_from).read_bytes()
                with open(path, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
        for root, dirs, _ in os.walk(temp):
            for d in dirs:
                _fsync_dir(os.path.join(root, d))
        os.chmod(temp, 0o755 & ~_umask())
        if dest.exists():  # --overwrite: the old folder goes only once the new one is complete
            old = tempfile.mkdtemp(prefix=f".{dest.name}.old.", suffix=TEMP_SUFFIX, dir=parent)
            os.rmdir(old)
            os.replace(dest, old)
            os.replace(temp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, dest)
        _fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(e, OSError):
            raise os_error_to_output_error(dest, e) from None
        raise
    return done
