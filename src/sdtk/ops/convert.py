"""`convert`: the options, their presets and conflicts, and the pipeline that turns one input
file into output plans (each op in its own module transforms the plan; nothing is read until the
writer asks for a tensor), then writes, checks and (on request) replaces the input.

Order of the steps: replace components -> bake VAE -> EMA (keep/drop/use) -> CLIP fixes ->
prune -> cast -> (extract). Casting comes last so baked and swapped-in tensors get the same
precision rules as the rest.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.architectures.vae_keys import vae_tensors
from sdtk.errors import OutputError, SdtkError, UsageError
from sdtk.fileio import AtomicOutput, all_or_nothing, same_file
from sdtk.formats import open_model
from sdtk.formats.catalogue import Catalogue
from sdtk.formats.data_hash import DataSectionHasher
from sdtk.formats.safetensors import write_safetensors
from sdtk.ops import lineage as lin
from sdtk.ops.cast import OverflowCount, cast_plan
from sdtk.ops.clip_fix import fix_clip
from sdtk.ops.components import TEXT_ENCODERS, component_of
from sdtk.ops.ema import EMA_MODES, apply_ema
from sdtk.ops.extract import expand_parts, extract_plans
from sdtk.ops.model_facts import ModelFacts, model_facts
from sdtk.ops.naming import default_output
from sdtk.ops.prefetch import Prefetcher
from sdtk.ops.prune import dropped_extras, prune_plan, summarize_dropped
from sdtk.ops.replace import parse_replace, replace_component
from sdtk.identify.config_yaml import read_config_beside
from sdtk.ops.sidecar import sidecar_for, sidecar_path
from sdtk.ops.vae import bake_vae
from sdtk.tensors import DType, LazyTensor, dtype

DTYPE_CHOICES = ("fp32", "fp16", "bf16", "fp8-e4m3fn", "fp8-e5m2")
PRESETS = ("generation", "training")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class OverflowRefused(SdtkError):
    """A cast would turn finite values into inf/NaN and the user did not allow it."""


@dataclass
class ConvertOptions:
    dtype: Optional[str] = None
    unet_dtype: Optional[str] = None
    vae_dtype: Optional[str] = None
    te_dtype: Optional[str] = None
    allow_overflow: bool = False
    ema: Optional[str] = None  # keep | drop | use; None: keep (generation: use when present)
    prune: bool = False
    keep_unknown: bool = False
    fix_clip: bool = False
    bake_vae: Optional[str] = None
    extract: List[str] = field(default_factory=list)
    replace: List[str] = field(default_factory=list)  # COMPONENT=FILE
    preset: Optional[str] = None  # generation | training
    prediction_type: Optional[str] = None  # stated by the user: epsilon | v | auto (SD2: the value check decides)
    sidecar: bool = True
    source_hashes: bool = True
    output_hash: bool = False  # --hash-output: modelspec.hash_sha256 (and sshs_model_hash) of the output's tensor bytes
    replace_input: bool = False
    overwrite: bool = False
    to: Optional[str] = None  # output format: safetensors (default) | gguf
    quant: Optional[str] = None  # with --to gguf: Q8_0, Q4_K_S, ... (sdtk.ops.gguf_rules.QUANT_CHOICES)
    nf4_double_quant: bool = False  # with --to nf4/fp4: double-quantized absmax (Forge v1 style)
    blocksize: Optional[int] = None  # with --to nf4/fp4: values per absmax block (default 64)

    @property
    def does_anything(self) -> bool:
        return any([self.dtype, self.unet_dtype, self.vae_dtype, self.te_dtype, self.ema not in (None, "keep"),
                    self.prune, self.fix_clip, self.bake_vae, self.extract, self.replace, self.preset])


def resolve_options(opts: ConvertOptions) -> ConvertOptions:
    """Apply a preset's defaults and refuse conflicting or invalid options (UsageError)."""
    for name in ("dtype", "unet_dtype", "vae_dtype", "te_dtype"):
        value = getattr(opts, name)
        if value is not None:
            try:
                canonical = dtype(value).short
            except KeyError:
                canonical = None
            if canonical not in DTYPE_CHOICES:
                flag = "--" + name.replace("_", "-")
                raise UsageError(None, f"{flag} {value}: choose one of {', '.join(DTYPE_CHOICES)}")
            opts = replace(opts, **{name: canonical})
    if opts.ema is not None and opts.ema not in EMA_MODES:
        raise UsageError(None, f"--ema {opts.ema}: choose keep, drop or use")
    if opts.preset is not None and opts.preset not in PRESETS:
        raise UsageError(None, f"--for {opts.preset}: choose generation or training")
    if opts.prediction_type is not None and opts.prediction_type not in ("epsilon", "v", "auto"):
        raise UsageError(None, f"--prediction-type {opts.prediction_type}: choose epsilon, v or auto")
    if opts.preset == "generation":
        if opts.ema == "keep":
            raise UsageError(None, "--for generation writes one weight set; it conflicts with --ema keep")
        opts = replace(opts, dtype=opts.dtype or "fp16", prune=True, fix_clip=True)
    elif opts.preset == "training":
        if opts.ema in ("drop", "use"):
            raise UsageError(None, f"--for training keeps the EMA weights; it conflicts with --ema {opts.ema}")
        if opts.prune:
            raise UsageError(None, "--for training keeps every tensor; it conflicts with --prune")
        opts = replace(opts, dtype=opts.dtype or "fp32", ema="keep")
    if opts.keep_unknown and not opts.prune:
        raise UsageError(None, "--keep-unknown only makes sense with --prune (or --for generation)")
    if opts.bake_vae and any(r.split("=", 1)[0].strip().lower() == "vae" for r in opts.replace):
        raise UsageError(None, "--bake-vae and --replace vae=... both replace the VAE; give one")
    if opts.replace_input and opts.extract:
        raise UsageError(None, "--replace-input cannot be combined with --extract (the input is not replaced by parts)")
    parts = [p for r in opts.replace for p in [parse_replace(r)[0]]]
    if len(parts) != len(set(parts)):
        raise UsageError(None, "--replace names the same component twice")
    if opts.extract:
        opts = replace(opts, extract=expand_parts(opts.extract))
    return _resolve_format(opts)


def _resolve_format(opts: ConvertOptions) -> ConvertOptions:
    """--to gguf --quant Q: a format of its own; it combines with none of the safetensors options."""
    if opts.to not in (None, "safetensors", "gguf", "fp8-scaled", "nf4", "fp4"):
        raise UsageError(None, f"--to {opts.to}: choose safetensors, gguf, fp8-scaled, nf4 or fp4")
    if opts.to not in ("nf4", "fp4") and (opts.nf4_double_quant or opts.blocksize is not None):
        raise UsageError(None, "--nf4-double-quant and --blocksize go with --to nf4 or --to fp4")
    if opts.to != "gguf":
        if opts.quant:
            raise UsageError(None, "--quant is for --to gguf")
        if opts.to in ("fp8-scaled", "nf4", "fp4") and (opts.does_anything or opts.replace_input or opts.output_hash):
            raise UsageError(None, f"--to {opts.to} does not combine with the other conversion options")
        if opts.to in ("nf4", "fp4"):
            from sdtk.quant.bnb4_quantize import BLOCKSIZES

            if opts.blocksize is not None and opts.blocksize not in BLOCKSIZES:
                raise UsageError(None, f"--blocksize {opts.blocksize}: bitsandbytes takes {', '.join(map(str, BLOCKSIZES))}")
        return opts
    from sdtk.ops.gguf_rules import QUANT_CHOICES

    quant = (opts.quant or "").upper()
    if quant not in QUANT_CHOICES:
        what = f"--quant {opts.quant}: not a GGUF type sdtk writes" if opts.quant else "--to gguf needs --quant"
        raise UsageError(None, f"{what}; choose one of {', '.join(QUANT_CHOICES)}")
    if replace(opts, extract=[]).does_anything or opts.replace_input or opts.output_hash:
        raise UsageError(None, "--to gguf writes the diffusion model as GGUF; it does not combine with --dtype, --prune, "
                               "--ema, --replace, --bake-vae, --fix-clip, --for, --replace-input or --hash-output")
    if "unet" in opts.extract:
        raise UsageError(None, "--to gguf: the GGUF is the diffusion model; --extract names the other parts to write "
                               "beside it as safetensors (vae, text-encoders, clip-l, ...)")
    return replace(opts, quant=quant)


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class OutputPlan:
    part: str  # "model" or an extracted part ("vae", "unet", "clip-l", ...)
    plan: List[LazyTensor]
    tags: List[str]
    metadata: Dict[str, str] = field(default_factory=dict)
    dest: Optional[Path] = None
    bytes_written: int = 0
    sidecar: Optional[Path] = None


@dataclass
class Conversion:
    source: Path
    facts: ModelFacts
    outputs: List[OutputPlan]
    operations: List[str]  # for lineage, in order
    notes: List[str]  # for people: what was chosen and why
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    dropped_extras: List[str] = field(default_factory=list)
    weight_set: Optional[str] = None
    sidecar_reason: Optional[str] = None
    sidecar_config: Optional[str] = None  # packaged config name, or None (input's yaml copied, or none)
    sidecar_text: Optional[str] = None  # the yaml written beside the model output
    overflow: OverflowCount = field(default_factory=OverflowCount)
    extra_inputs: List[str] = field(default_factory=list)
    prediction_type: Optional[str] = None
    source_hashes: str = "skipped"  # "computed" (first time: read the input), "cache" (hash cache), "skipped"


def v_pred_marker() -> LazyTensor:
    """The empty fp16 `v_pred` tensor SDXL v-prediction files carry (ComfyUI model_detection.py)."""
    from sdtk.tensors import DTYPES

    return LazyTensor("v_pred", DTYPES["F16"], (0,), lambda: np.zeros((0,), dtype=np.float16))


FP8 = ("fp8-e4m3fn", "fp8-e5m2")
SIXTEEN_BIT_PARTS = ("vae",) + TEXT_ENCODERS  # fp8 checkpoints of ComfyUI and Forge keep these in 16-bit


def _target_dtype_rule(opts: ConvertOptions) -> Callable[[LazyTensor], Optional[DType]]:
    """The dtype each tensor is cast to (None: unchanged). `--dtype fp8-*` casts the UNet/DiT only:
    the VAE and text encoders stay 16-bit (fp32 ones become fp16), as in the fp8 checkpoints
    ComfyUI and Forge make; --vae-dtype / --te-dtype fp8-* cast them too."""
    by_component = {"unet": opts.unet_dtype, "ema": opts.unet_dtype, "vae": opts.vae_dtype}
    for te in TEXT_ENCODERS:
        by_component[te] = opts.te_dtype

    def target(t: LazyTensor) -> Optional[DType]:
        part = component_of(t.name) or ""
        name = by_component.get(part)
        if name is None and opts.dtype in FP8 and part in SIXTEEN_BIT_PARTS:
            return dtype("fp16") if t.dtype.name == "F32" else None
        name = name or opts.dtype
        return dtype(name) if name else None

    return target


def _dtype_tags(opts: ConvertOptions) -> List[str]:
    if opts.dtype:
        return [opts.dtype]
    return [f"{part}-{d}" for part, d in (("unet", opts.unet_dtype), ("vae", opts.vae_dtype), ("te", opts.te_dtype)) if d]


def plan_conversion(cat: Catalogue, opts: ConvertOptions, stack: contextlib.ExitStack) -> Conversion:
    """Plan every output of converting `cat` (files named by options are opened into `stack`)."""
    path = cat.path
    from sdtk.quant.views import dequantize_catalogue

    dequantize_catalogue(cat)  # an fp8-scaled input converts from its values (scales applied)
    input_config = read_config_beside(path)  # A1111's `<model>.yaml`: evidence, and copied when it agrees
    facts = model_facts(cat, config=input_config, deep=opts.prediction_type == "auto")
    conv = Conversion(Path(path), facts, [], [], [])
    conv.notes.extend(fact_notes(facts))
    plan: List[LazyTensor] = list(cat.tensors.values())
    tags: List[str] = []

    for spec in opts.replace:
        component, donor_path = parse_replace(spec)
        donor = stack.enter_context(open_model(donor_path))
        if component == "vae":
            result = bake_vae(plan, vae_tensors(donor.tensors, donor_path), facts.family, donor_path)
            plan = result.plan
        else:
            plan = replace_component(plan, component, donor.tensors, donor_path, path).plan
        conv.extra_inputs.append(donor_path)
        conv.operations.append(f"replace {component} from {Path(donor_path).name}")
        tags.append(f"new-{component}")

    if opts.bake_vae:
        vae_cat = stack.enter_context(open_model(opts.bake_vae))
        vae = vae_tensors(vae_cat.tensors, opts.bake_vae)
        baked = bake_vae(plan, vae, facts.family, opts.bake_vae)
        plan = baked.plan
        conv.extra_inputs.append(opts.bake_vae)
        conv.operations.append(f"bake-vae {Path(opts.bake_vae).name} ({vae.layout} layout) under {baked.prefix}*")
        conv.notes.append(f"VAE {Path(opts.bake_vae).name} baked in under {baked.prefix}* "
                          f"({baked.added} tensors{', mapped from diffusers names' if vae.layout == 'diffusers' else ''})")
        tags.append("vae")

    ema_mode = opts.ema
    if ema_mode is None:  # generation: the EMA weights (as official releases); --prune: the normal ones
        ema_mode = "use" if (opts.preset == "generation" and facts.has_ema) else (
            "drop" if ((opts.prune or "unet" in opts.extract) and facts.has_ema) else "keep")
    if facts.has_ema or ema_mode == "use":
        result = apply_ema(plan, ema_mode, path)
        plan = result.plan
        if ema_mode == "use":
            conv.weight_set = "ema"
            conv.operations.append(f"ema use ({result.replaced} UNet tensors from model_ema.*)")
            why = (" (--for generation default: official base releases publish the EMA weights for inference; "
                   "A1111 would load the non-EMA weights of this file; pass --ema drop to keep those)"
                   if opts.ema is None else "")
            conv.notes.append(f"weights: took the EMA weights (model_ema.*) as the UNet weights{why}")
            if result.missing:
                conv.notes.append(f"{len(result.missing)} UNet tensors have no EMA copy; their normal weights were kept")
            tags.append("emaonly")
        elif ema_mode == "drop":
            conv.weight_set = "non-ema"
            conv.operations.append(f"ema drop ({len(result.dropped)} model_ema.* tensors)")
            default_why = ("; --extract unet writes one weight set: pass --ema use for the EMA copy)" if opts.extract
                           else "; --prune drops the EMA copy unless --ema keep or --ema use)")
            conv.notes.append("weights: kept the non-EMA weights (model.diffusion_model.*), dropped the EMA copy "
                              "(the weights A1111 loads from a file holding both" +
                              (default_why if opts.ema is None else ")"))
            tags.append("noema")
        elif opts.extract and "unet" in opts.extract:
            conv.weight_set = "non-ema"  # extraction writes model.diffusion_model.* only
            conv.notes.append("weights: the extracted UNet holds the non-EMA weights (model.diffusion_model.*); "
                              "--ema use extracts the EMA copy instead")
        elif opts.extract:
            conv.weight_set = None  # no UNet among the parts: no weight set chosen
        else:
            conv.weight_set = "both"
            conv.notes.append("weights: kept both the model weights and the EMA copy (model_ema.*)")

    if opts.fix_clip:
        fixed = fix_clip(plan)
        plan = fixed.plan
        detail = []
        if fixed.reset:
            detail.append(f"{len(fixed.reset)} position_ids written as 0..n-1 int64, {len(fixed.were_broken)} had been damaged")
        if fixed.renamed:
            detail.append(f"{len(fixed.renamed)} NovelAI-style CLIP keys renamed")
        conv.operations.append("fix-clip" + (f" ({'; '.join(detail)})" if detail else " (nothing to fix)"))
        if fixed.were_broken:
            conv.notes.append(f"CLIP position_ids were damaged and are now 0..76 int64: {', '.join(fixed.were_broken)}")
        if fixed.renamed:
            conv.notes.append(f"renamed {len(fixed.renamed)} NovelAI-era CLIP keys to the text_model.* names")

    if opts.prune:
        keep_ema = opts.ema == "keep" or (ema_mode == "keep" and facts.has_ema)
        pruned = prune_plan(plan, keep_ema=keep_ema, keep_unknown=opts.keep_unknown)
        plan = pruned.plan
        conv.dropped = pruned.dropped
        conv.dropped_extras = dropped_extras(cat.extras)
        counts = summarize_dropped(pruned.dropped)
        conv.operations.append("prune" + (f" (dropped {len(pruned.dropped)} tensors)" if pruned.dropped else " (nothing else to drop)"))
        if counts:
            conv.notes.append("pruned: " + ", ".join(f"{n} {reason}" for reason, n in counts.items()))
        if pruned.kept_unknown:
            conv.notes.append(f"kept {len(pruned.kept_unknown)} unknown keys (--keep-unknown)")
        tags.append("pruned")
    elif cat.extras:
        conv.dropped_extras = dropped_extras(cat.extras)
    if conv.dropped_extras:
        conv.notes.append("left out non-tensor training state of the checkpoint: " + ", ".join(conv.dropped_extras))

    plan, n_cast = cast_plan(plan, _target_dtype_rule(opts), conv.overflow)
    if n_cast:
        conv.operations.append(f"cast {', '.join(_dtype_tags(opts))} ({n_cast} tensors)")
    if opts.dtype in FP8 and any(component_of(t.name) in SIXTEEN_BIT_PARTS for t in plan) and not (opts.vae_dtype and opts.te_dtype):
        conv.notes.append(f"--dtype {opts.dtype} casts the UNet/DiT only: the VAE and text encoders stay 16-bit (fp32 "
                          "ones become fp16), as in ComfyUI's and Forge's fp8 checkpoints; --vae-dtype/--te-dtype "
                          f"{opts.dtype} cast them too")
    tags = _dtype_tags(opts) + tags

    if opts.prediction_type in ("epsilon", "v"):
        facts = conv.facts = facts.stated(opts.prediction_type)
    elif opts.prediction_type == "auto":
        facts = conv.facts = _auto_prediction(facts, conv.notes)
    prediction = facts.prediction_type
    conv.prediction_type = prediction
    names = {t.name for t in plan}
    if (facts.certain and prediction == "v" and facts.family == "sdxl" and "v_pred" not in names
            and "edm_vpred.sigma_max" not in names and (not opts.extract or "unet" in opts.extract)
            and facts.kind in ("checkpoint", "diffusion-model")):
        plan.append(v_pred_marker())  # what ComfyUI, Forge and A1111 read to select v-prediction
        names.add("v_pred")
        conv.operations.append(f"add v_pred marker ({'--prediction-type v' if facts.prediction_source == 'stated' else facts.prediction_source})")
        conv.notes.append("added the empty v_pred marker tensor, which ComfyUI, Forge and A1111 read to use v-prediction")

    if opts.extract:
        for part, part_plan in extract_plans(plan, opts.extract, path).items():
            conv.outputs.append(OutputPlan(part, part_plan, tags + [part]))
        conv.operations.append(f"extract {', '.join(o.part for o in conv.outputs)}")
    else:
        conv.outputs.append(OutputPlan("model", plan, tags))
        decision = sidecar_for(facts, input_config)
        conv.sidecar_reason = decision.reason
        conv.sidecar_config = decision.config if opts.sidecar else None
        conv.sidecar_text = decision.text if opts.sidecar else None
        if decision.text and not opts.sidecar:
            conv.sidecar_reason = f"not written (--no-sidecar); {decision.reason}"
    return conv


def fact_notes(facts: ModelFacts) -> List[str]:
    """What convert tells about the evidence: contradictions, a yaml it could not use."""
    notes = []
    for p in facts.problems:
        d = p.details
        if p.code == "config_unreadable":
            notes.append(f"ignored {d['config']} beside the input: it {d['error']}; no yaml is copied to the output")
        elif p.code == "config_mismatch":
            notes.append(f"ignored {d['config']} beside the input: it describes a {d['config_family']} model "
                         f"(context_dim {d['context_dim']}) but the weights are {d['family']}")
        elif p.code == "prediction_conflict":
            notes.append(f"prediction type: {d['loser_source']} says {d['loser']} ({d['detail']}) but "
                         f"{d['winner_source']} says {d['winner']}; followed {d['winner_source']} (the stronger evidence)")
        elif p.code == "programs_disagree":
            notes.append(f"prediction type: A1111 would load the input as {d['a1111']} ({d['a1111_how']}), ComfyUI as "
                         f"{d['comfyui']} ({d['comfyui_how']}); recorded {d['winner']} ({d['winner_source']})")
    return notes


def _auto_prediction(facts: ModelFacts, notes: List[str]) -> ModelFacts:
    """--prediction-type auto: evidence of high confidence stands; else (SD2) the value check
    decides and its answer is taken as stated, with its confidence said."""
    if facts.certain:
        notes.append(f"--prediction-type auto: {facts.prediction_type} from {facts.prediction_source} (high confidence)")
        return facts
    if facts.prediction_source == "heuristic" and facts.prediction_type in ("epsilon", "v"):
        detail = next((e["detail"] for e in facts.evidence if e["source"] == "heuristic"), "")
        notes.append(f"--prediction-type auto: {facts.prediction_type} from the value check ({facts.prediction_confidence} "
                     f"confidence: {detail}); recorded as stated by you")
        return facts.stated(facts.prediction_type)
    notes.append("--prediction-type auto: no evidence decides the prediction type (the value check needs a "
                 "trained SD2 UNet); nothing recorded")
    return facts


# ---------------------------------------------------------------------------------------------
# Metadata


def _metadata_for(cat: Catalogue, conv: Conversion, out: OutputPlan, opts: ConvertOptions,
                  hashes: Dict[str, str], output_hash: Optional[str] = None) -> Dict[str, str]:
    assert out.dest is not None
    title = lin.title_of(out.dest)
    base = dict(cat.metadata)
    facts = conv.facts
    arch = facts.modelspec_architecture  # None when not known for sure (SD2 without its prediction type)
    if out.part != "model":
        base = {k: v for k, v in base.items() if not k.startswith("modelspec.")}
        arch = (f"{arch}/vae" if out.part == "vae" else arch if out.part == "unet" else None) if arch else None
    # only facts of high confidence become ModelSpec; they correct the input's ModelSpec keys
    prediction = facts.modelspec_prediction if out.part in ("model", "unet") else None
    modelspec = lin.modelspec_additions(base, arch, title, prediction, prediction is not None)
    if arch and prediction and facts.family == "sd2" and base.get("modelspec.architecture", arch) != arch:
        modelspec["modelspec.architecture"] = arch  # e.g. an input labelled -512 whose yaml says v
    record = facts.as_record() if out.part in ("model", "unet") else {}
    if conv.weight_set and out.part in ("model", "unet"):
        record["weights"] = conv.weight_set
    step = lin.Lineage(conv.source.name, cat.file_size or lin.file_size(cat.path), list(conv.operations), hashes,
                       facts=record)
    return lin.with_output_hash(lin.output_metadata(base, modelspec, step), output_hash)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class Progress:
    """Callbacks for a progress display: start(output, total_bytes), advance(bytes_done), done(),
    and hashing(source, bytes_done, total) from the source-hash thread (first conversion of a file)."""

    start: Callable[[Path, int], None] = lambda dest, total: None
    advance: Callable[[int], None] = lambda done: None
    done: Callable[[], None] = lambda: None
    hashing: Callable[[Path, int, int], None] = lambda source, done, total: None


def choose_destinations(conv: Conversion, output: Optional[Path], out_folder: Optional[Path],
                        opts: ConvertOptions) -> None:
    taken: List[Path] = []
    single = len(conv.outputs) == 1
    for out in conv.outputs:
        if output is not None and single and not output.is_dir():
            out.dest = output
        else:
            folder = output if (output is not None and output.is_dir()) else out_folder
            if output is not None and not single and not output.is_dir():
                raise UsageError(output, "several outputs (--extract): give a folder with -o, or no -o")
            out.dest = default_output(conv.source, out.tags, folder, overwrite=opts.overwrite, taken=taken)
        if out.dest.suffix.lower() != ".safetensors":
            raise UsageError(out.dest, "sdtk writes .safetensors files only; name the output *.safetensors")
        taken.append(out.dest)


def write_outputs(cat: Catalogue, conv: Conversion, opts: ConvertOptions, progress: Progress = Progress()) -> None:
    """Write every planned output atomically (nothing is left behind on any error)."""
    hasher = (lin.BackgroundHashes(cat.path, on_progress=lambda done, total: progress.hashing(conv.source, done, total))
              if opts.source_hashes else None)
    inputs = [cat.path, *conv.extra_inputs]
    for out in conv.outputs:
        placeholder = {name: lin.HASH_PLACEHOLDER for name in lin.HASH_NAMES} if hasher else {}
        data_hasher = DataSectionHasher() if opts.output_hash else None
        pending = lin.OUTPUT_HASH_PLACEHOLDER if data_hasher else None
        metadata = _metadata_for(cat, conv, out, opts, placeholder, pending)
        total = sum(t.nbytes for t in out.plan)
        progress.start(out.dest, total)

        dtypes = {t.name: t.dtype for t in out.plan}

        def on_tensor(t: LazyTensor, done: int) -> None:
            if conv.overflow.total and not opts.allow_overflow:
                name, n = next(iter(conv.overflow.by_tensor.items()))
                raise OverflowRefused(cat.path, overflow_message(name, n, dtypes.get(name, t.dtype)))
            progress.advance(done)

        def final_metadata(out=out, data_hasher=data_hasher) -> Dict[str, str]:
            return _metadata_for(cat, conv, out, opts, hasher.result() if hasher else placeholder,
                                 data_hasher.hexdigest if data_hasher else None)

        prefetch = Prefetcher(out.plan)
        try:
            out.bytes_written = write_safetensors(out.dest, prefetch.plan, metadata, inputs=inputs,
                                                  overwrite=opts.overwrite, on_tensor=on_tensor,
                                                  final_metadata=final_metadata if (hasher or data_hasher) else None,
                                                  data_hasher=data_hasher)
        except BaseException:
            if hasher is not None:  # failed or interrupted: stop the source-hash read (nothing cached)
                hasher.cancel()
            raise
        finally:
            prefetch.close()
            progress.done()
        if hasher is not None:
            conv.source_hashes = "cache" if hasher.from_cache else "computed"
        if out.part == "model" and conv.sidecar_text:
            out.sidecar = sidecar_path(out.dest)
            with AtomicOutput(out.sidecar, inputs=inputs, overwrite=opts.overwrite) as f:
                f.write(conv.sidecar_text.encode("utf-8"))


def overflow_message(name: str, n: int, target: DType) -> str:
    """Why a cast is refused: fp16/bf16/e5m2 turn too-large values into inf; fp8-e4m3fn has no
    inf, and sdtk (as torch) saturates them to +-448 (sdtk.ops.cast SATURATING)."""
    if target.name == "F8_E4M3":
        return (f"casting would clip values: {n} values of {name} lie beyond +-448, the range of fp8-e4m3fn, and "
                "would be saturated to +-448 (as torch does); use fp8-e5m2 or a 16-bit dtype, or pass --allow-overflow")
    return (f"casting would overflow: {n} values of {name} exceed the range of {target.short} and would become "
            "inf; use --dtype bf16 (same size, fp32's range) or pass --allow-overflow")


def verify_output(dest: Path, plan: Sequence[LazyTensor]) -> None:
    """Re-read `dest` and compare every tensor with the plan, byte for byte (raises OutputError)."""
    with open_model(dest) as written:
        names = list(written.tensors)
        if names != [t.name for t in plan]:
            raise OutputError(dest, "verification failed: the written tensor names differ from the plan")
        for t in plan:
            got = written.tensors[t.name]
            if got.dtype != t.dtype or tuple(got.shape) != tuple(t.shape):
                raise OutputError(dest, f"verification failed: {t.name} was written as {got.dtype}{list(got.shape)}")
            a, b = np.ascontiguousarray(got.read()), np.ascontiguousarray(t.read())
            if a.tobytes() != b.tobytes():
                raise OutputError(dest, f"verification failed: {t.name} differs from its planned values")


def _gguf_with_parts(source: Path, opts: ConvertOptions, output: Optional[Path], out_folder: Optional[Path],
                     progress: Progress) -> dict:
    """`--to gguf --extract vae,text-encoders`: the diffusion model as GGUF and the parts a GGUF
    leaves out (city96's files hold the diffusion model alone) as the stand-alone safetensors files
    ComfyUI's VAE and CLIP loaders take, in one folder. Nothing is written when a part is missing."""
    from sdtk.ops.to_gguf import convert_file_to_gguf

    if output is not None and not output.is_dir():
        raise UsageError(output, "several outputs (--to gguf with --extract): give a folder with -o, or no -o")
    with open_model(source) as cat:  # a part the model lacks is refused before anything is written
        extract_plans(list(cat.tensors.values()), opts.extract, str(source))
    summary = convert_file_to_gguf(source, opts.quant, output, out_folder, opts.overwrite, progress)
    try:
        _, parts = convert_file(source, replace(opts, to=None, quant=None), output=output, out_folder=out_folder,
                                progress=progress)
    except BaseException:  # full disk, Ctrl-C: no half set of outputs
        Path(summary["outputs"][0]["path"]).unlink(missing_ok=True)
        raise
    extracted = {o["part"] for o in parts["outputs"]}
    summary["outputs"] += parts["outputs"]
    summary["operations"] += parts["operations"]
    summary["dropped"] = [d for d in summary["dropped"] if component_of(d["key"]) not in extracted]
    summary["source_hashes"] = parts["source_hashes"]
    left = len(summary["dropped"])
    summary["notes"] = [n for n in summary["notes"] if not n.startswith("left out ")] + parts["notes"]
    if left:
        summary["notes"].append(f"left out {left} tensors that are in neither output (schedule buffers, parts not "
                                f"asked for with --extract)")
    return summary


def convert_file(source: Path, opts: ConvertOptions, output: Optional[Path] = None, out_folder: Optional[Path] = None,
                 progress: Progress = Progress()) -> Tuple[Conversion, dict]:
    """Convert one file; returns the conversion and its JSON summary."""
    if opts.to == "gguf":
        from sdtk.ops.to_gguf import convert_file_to_gguf

        if opts.extract:
            return None, _gguf_with_parts(source, opts, output, out_folder, progress)
        return None, convert_file_to_gguf(source, opts.quant, output, out_folder, opts.overwrite, progress)
    if opts.to == "fp8-scaled":
        from sdtk.ops.to_fp8_scaled import convert_file_to_fp8_scaled

        return None, convert_file_to_fp8_scaled(source, output, out_folder, opts.overwrite, progress)
    if opts.to in ("nf4", "fp4"):
        from sdtk.ops.to_nf4 import convert_file_to_nf4

        return None, convert_file_to_nf4(source, output, out_folder, opts.overwrite, progress, quant_type=opts.to,
                                         blocksize=opts.blocksize or 64, double_quant=opts.nf4_double_quant)
    replacing = opts.replace_input
    with contextlib.ExitStack() as stack:
        cat = stack.enter_context(open_model(source))  # hostile or broken files are refused here
        conv = plan_conversion(cat, opts, stack)
        final_dest: Optional[Path] = None
        if replacing:
            final_dest = source.with_suffix(".safetensors")
            if final_dest.exists() and not same_file(final_dest, source) and not opts.overwrite:
                raise OutputError(final_dest, "already exists; pass --overwrite to replace it with the converted input")
            conv.outputs[0].dest = default_output(source, ["sdtk-new"], source.parent, taken=[final_dest])
            write_outputs(cat, conv, opts, progress)  # verified below before it replaces the input
        else:
            choose_destinations(conv, output, out_folder, opts)
            with all_or_nothing():  # every part (and the yaml) appears, or none does
                write_outputs(cat, conv, opts, progress)
        if replacing:
            out = conv.outputs[0]
            try:
                verify_output(out.dest, out.plan)
            except BaseException:
                _remove_quietly(out.dest)
                if out.sidecar:
                    _remove_quietly(out.sidecar)
                raise
    if replacing:
        _replace_input(source, conv, final_dest)
    return conv, summary_of(conv, opts)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _replace_input(source: Path, conv: Conversion, final_dest: Path) -> None:
    """The verified output takes the input's place (same name with .safetensors); the input goes."""
    out = conv.outputs[0]
    os.replace(out.dest, final_dest)
    if out.sidecar:
        yaml = sidecar_path(final_dest)
        os.replace(out.sidecar, yaml)
        out.sidecar = yaml
    if source.exists() and os.path.abspath(source) != os.path.abspath(final_dest):
        os.unlink(source)
    out.dest = final_dest
    conv.notes.append(f"verified every tensor of the output, then replaced {source.name} by {final_dest.name}")


def summary_of(conv: Conversion, opts: ConvertOptions) -> dict:
    return {
        "input": str(conv.source),
        "architecture": conv.facts.architecture,
        "prediction_type": conv.prediction_type,
        "weight_set": conv.weight_set,
        "operations": conv.operations,
        "outputs": [
            {"part": o.part, "path": str(o.dest), "tensors": len(o.plan), "bytes": o.bytes_written,
             "sidecar": str(o.sidecar) if o.sidecar else None}
            for o in conv.outputs
        ],
        "dropped": [{"key": k, "reason": r} for k, r in conv.dropped],
        "dropped_training_state": conv.dropped_extras,
        "overflow": conv.overflow.by_tensor,
        "sidecar": conv.sidecar_reason,
        "notes": conv.notes,
        "source_hashes": conv.source_hashes,
        "input_replaced": bool(opts.replace_input),
    }


def model_files_in(folder: Path) -> List[Path]:
    """Model files directly in `folder`, sorted by name (batch conversion)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
                  and not p.name.endswith(".sdtk-partial"))
