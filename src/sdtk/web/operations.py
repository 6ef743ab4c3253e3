"""What the app can do, as a table: one row per operation (form -> job parameters -> the same
library call the CLI makes). A new operation (LoRA, GGUF, diffusers...) is one more row in
OPERATIONS with its `parse` and `run` functions, and a form template when it has options.

`parse(form, files)` runs in the request: it turns the submitted form into job parameters and
refuses bad input at once (unknown ids, files outside the roots, bad names, conflicting options)
so the user sees the message beside the button. `run(ctx, params)` runs in the job thread;
everything it reports through `ctx.progress` is also the point where a cancel takes effect.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sdtk.adapters.block_weights import PRESETS as LBW_PRESETS  # the lora apply form offers the preset names
from sdtk.errors import SdtkError, UsageError
from sdtk.web.security import contained, output_name

Form = Dict[str, List[str]]


def one(form: Form, key: str, default: str = "") -> str:
    values = form.get(key) or [default]
    return (values[0] or default).strip()


def flag(form: Form, key: str) -> bool:
    return one(form, key) in ("1", "on", "true", "yes")


def optional(form: Form, key: str, choices: Sequence[str]) -> Optional[str]:
    value = one(form, key)
    if not value:
        return None
    if value not in choices:
        raise UsageError(None, f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def number(form: Form, key: str) -> Optional[float]:
    value = one(form, key)
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise UsageError(None, f"{key}: {value!r} is not a number") from None


class Files:
    """Resolves library ids to files the server may touch: present, under a root (real path,
    symlinks resolved), and unchanged since indexed."""

    def __init__(self, conn, roots: Sequence[str]):
        self.conn, self.roots = conn, list(roots)

    def get(self, id_text: str, what: str = "file") -> Tuple[Any, str]:
        from sdtk.web.catalog import by_id

        try:
            file_id = int(id_text)
        except (TypeError, ValueError):
            raise UsageError(None, f"{what}: choose a file from the library") from None
        row = by_id(self.conn, file_id)
        if row is None:
            raise SdtkError(None, f"{what}: no file {file_id} in the library")
        real = contained(row["path"], self.roots)
        if real is None:
            raise SdtkError(row["path"], "is outside the folders this server serves; refused")
        if not os.path.isfile(real):
            raise SdtkError(row["path"], "is no longer there (vanished since it was indexed); re-index its folder")
        return row, real

    def output_beside(self, source_real: str, name_text: str, suffixes: Optional[Tuple[str, ...]] = (".safetensors",)) -> Optional[str]:
        """The output path for a user-given file name, in the source's folder (None: default name).
        `suffixes`: the endings allowed (None: a folder name, for a diffusers folder)."""
        if not name_text.strip():
            return None
        name = output_name(name_text, suffixes)
        if name is None:
            what = ("a plain folder name" if suffixes is None else
                    "a plain file name ending in " + " or ".join(suffixes))
            raise UsageError(None, f"output name {name_text!r}: give {what} (no folders); it is written beside the input")
        dest = os.path.join(os.path.dirname(source_real), name)
        if contained(os.path.dirname(dest), self.roots) is None:
            raise SdtkError(dest, "is outside the folders this server serves; refused")
        return dest


def check_unchanged(row, real: str) -> None:
    """A job on a file that changed since it was indexed would describe the wrong file: refuse it."""
    try:
        st = os.stat(real)
    except OSError as e:
        raise SdtkError(real, f"cannot be read now ({e.strerror or e})") from None
    if (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
        raise SdtkError(real, "changed since it was indexed; re-index its folder (Index job) and try again")


def index_outputs(ctx, paths: List[str]) -> List[Dict[str, Any]]:
    """Link written files into the library: rescan the root holding each (unchanged files are not
    read again), then look their ids up."""
    from sdtk.library.scan import scan_library

    roots = sorted({r for p in paths for r in ctx.settings.roots if contained(p, [r])})
    if roots:
        ctx.log(f"indexing the result into the library ({', '.join(roots)})")
        scan_library(ctx.conn, roots, content=True)
    out = []
    for p in paths:
        if os.path.isdir(p):  # a diffusers folder: the folder, then each model file the library holds in it
            out.append({"path": p, "name": os.path.basename(p) + "/", "id": None})
            base = os.path.normpath(p) + os.sep
            for row in ctx.conn.execute("SELECT id, path FROM files WHERE path >= ? AND path < ? AND status = 'present' "
                                        "ORDER BY path", (base, base[:-1] + chr(ord(os.sep) + 1))):
                out.append({"path": row["path"], "name": os.path.relpath(row["path"], os.path.dirname(p)), "id": row["id"]})
            continue
        row = ctx.conn.execute("SELECT id FROM files WHERE path = ?", (os.path.normpath(p),)).fetchone()
        out.append({"path": p, "name": os.path.basename(p), "id": row["id"] if row else None})
    return out


# -- convert ---------------------------------------------------------------------------------
CONVERT_DTYPES = ("fp32", "fp16", "bf16", "fp8-e4m3fn", "fp8-e5m2")
EXTRACT_PARTS = ("vae", "unet", "clip-l", "clip-g", "open-clip-h", "t5xxl", "text-encoders")
REPLACE_PARTS = ("vae", "unet", "clip-l", "clip-g", "open-clip-h", "t5xxl")  # `--replace` (sdtk.ops.extract.EXTRACTABLE)
REPLACE_DONOR_KINDS = ("checkpoint", "vae", "text-encoder", "diffusion-model")  # library kinds offered as the file
MAX_REPLACE = 3  # `--replace` rows on the form (the CLI takes one per component)
# `convert --to` (sdtk.cli.convert.CONVERT_TARGETS): target -> the output's allowed endings (None: a folder)
CONVERT_TARGETS: Dict[str, Optional[Tuple[str, ...]]] = {
    "safetensors": (".safetensors",), "gguf": (".gguf",), "fp8-scaled": (".safetensors",), "diffusers": None,
}


def gguf_quants() -> Tuple[str, ...]:
    from sdtk.ops.gguf_rules import QUANT_CHOICES

    return QUANT_CHOICES


def diffusers_variants() -> Tuple[str, ...]:
    from sdtk.ops.diffusers.write import VARIANTS

    return VARIANTS


def parse_convert(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    from sdtk.ops.convert import ConvertOptions, resolve_options

    row, real = files.get(one(form, "file"))
    to = optional(form, "to", tuple(CONVERT_TARGETS)) or "safetensors"
    bake = one(form, "bake_vae")
    bake_path = files.get(bake, "VAE to bake")[1] if bake else None
    extract = [p for p in form.get("extract", []) if p]
    for p in extract:
        if p not in EXTRACT_PARTS:
            raise UsageError(None, f"extract: {p!r} is not one of {', '.join(EXTRACT_PARTS)}")
    replace, donors = [], []
    for i in range(MAX_REPLACE):  # `--replace COMPONENT=FILE`: a part taken from another library file
        part, donor_id = one(form, f"replace_part_{i}"), one(form, f"replace_file_{i}")
        if not part and not donor_id:
            continue
        if not part or not donor_id:
            raise UsageError(None, "replace: choose both the part and the file to take it from")
        if part not in REPLACE_PARTS:
            raise UsageError(None, f"replace: {part!r} is not one of {', '.join(REPLACE_PARTS)}")
        donor_row, donor = files.get(donor_id, f"file to take the {part} from")
        if donor == real:
            raise UsageError(None, f"replace {part}: choose another file than the model itself")
        replace.append(f"{part}={donor}")
        donors.append({"path": donor, "size": donor_row["size"], "mtime_ns": donor_row["mtime_ns"]})
    quant = optional(form, "quant", gguf_quants()) if to == "gguf" else None
    variant = optional(form, "variant", diffusers_variants()) if to == "diffusers" else None
    options = dict(
        dtype=optional(form, "dtype", CONVERT_DTYPES), unet_dtype=optional(form, "unet_dtype", CONVERT_DTYPES),
        vae_dtype=optional(form, "vae_dtype", CONVERT_DTYPES), te_dtype=optional(form, "te_dtype", CONVERT_DTYPES),
        allow_overflow=flag(form, "allow_overflow"), ema=optional(form, "ema", ("keep", "drop", "use")),
        prune=flag(form, "prune"), keep_unknown=flag(form, "keep_unknown"), fix_clip=flag(form, "fix_clip"),
        bake_vae=bake_path, extract=extract, replace=replace, preset=optional(form, "preset", ("generation", "training")),
        prediction_type=optional(form, "prediction_type", ("epsilon", "v")), sidecar=not flag(form, "no_sidecar"),
        source_hashes=not flag(form, "no_source_hash"), output_hash=flag(form, "hash_output"),
        overwrite=flag(form, "overwrite"),
        to=to if to in ("gguf", "fp8-scaled") else None, quant=quant,
    )
    if to == "diffusers" and extract:
        raise UsageError(None, "--to diffusers writes one folder; it cannot be combined with --extract")
    resolve_options(ConvertOptions(**options))  # conflicts refused now, in the page (the CLI's own checks)
    output = files.output_beside(real, one(form, "output"), CONVERT_TARGETS[to])
    if output and extract:
        raise UsageError(None, "--extract writes several files named after their part; leave the output name empty")
    if output is None and to == "diffusers":
        from sdtk.ops.diffusers.convert import default_folder

        output = str(default_folder(Path(real)))
    preset = one(form, "preset")
    what = {"gguf": f" to GGUF {quant}", "fp8-scaled": " to fp8-scaled", "diffusers": " to a diffusers folder"}.get(to, "")
    return (f"convert {os.path.basename(real)}{what}" + (f" ({preset})" if preset else ""),
            {"file_id": row["id"], "input_path": real, "size": row["size"], "mtime_ns": row["mtime_ns"],
             "options": options, "output_path": output, "to": to, "variant": variant, "donors": donors})


def run_convert(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    """`sdtk convert IN [--to safetensors|gguf|fp8-scaled|diffusers]`: the library calls the CLI makes."""
    from sdtk.ops.convert import ConvertOptions, Progress, convert_file, resolve_options

    check_unchanged(p, p["input_path"])
    for donor in p.get("donors", []):
        check_unchanged(donor, donor["path"])
    opts = resolve_options(ConvertOptions(**p["options"]))
    progress = Progress(start=lambda dest, total: ctx.progress(0, total, f"writing {Path(dest).name}"),
                        advance=lambda done: ctx.progress(done),
                        hashing=lambda source, done, total: ctx.check())
    output = Path(p["output_path"]) if p.get("output_path") else None
    if p.get("to") == "diffusers":
        from sdtk.ops.diffusers.convert import to_diffusers

        summary = to_diffusers(Path(p["input_path"]), opts, output, variant=p.get("variant"), progress=progress)
        written = [summary["output"]]
    else:
        _, summary = convert_file(Path(p["input_path"]), opts, output=output, progress=progress)
        written = [o["path"] for o in summary["outputs"]]
    for op in summary["operations"]:
        ctx.log(f"done: {op}")
    for note in summary["notes"]:
        ctx.log(note)
    return {"outputs": index_outputs(ctx, written), "summary": summary}


# -- merge -----------------------------------------------------------------------------------
def merge_recipe_from_form(form: Form, files: Files):
    """(recipe, {A: row, B: row, ...}, block spec text) from the merge form (also the preview)."""
    from sdtk.ops.merge import methods as M
    from sdtk.ops.merge.recipe import single_step_recipe

    rows, paths = {}, []
    for name in ("A", "B", "C"):
        value = one(form, f"model_{name.lower()}")
        if value:
            rows[name], real = files.get(value, f"model {name}")
            paths.append(real)
    if len(paths) < 2:
        raise UsageError(None, "choose at least models A and B")
    method = one(form, "method", "weighted-sum")
    if method not in M.METHODS:
        raise UsageError(None, f"method {method!r}: one of {', '.join(M.METHODS)}")
    blocks = None
    if flag(form, "use_blocks"):
        preset = one(form, "block_preset")  # a preset untouched: its name (exact values, as the CLI's --blocks NAME)
        values = [one(form, f"block_{i}") for i in range(64) if one(form, f"block_{i}") != ""]
        blocks = preset or (",".join(values) if values else None)
    try:
        seed = int(one(form, "seed", "0") or 0)
    except ValueError:
        raise UsageError(None, "seed: a whole number") from None
    recipe = single_step_recipe(paths, method, number(form, "alpha"), number(form, "beta"), seed, blocks,
                                optional(form, "te", ("merge", "A", "B")) or "merge",
                                optional(form, "vae", ("merge", "A", "B")) or "merge",
                                one(form, "exclude") or None, optional(form, "dtype", CONVERT_DTYPES), None)
    recipe.validate()
    return recipe, rows, blocks


def recipe_yaml(recipe) -> str:
    """The recipe as `sdtk merge --recipe FILE` reads it (models by file name)."""
    import yaml
    from dataclasses import asdict

    data: Dict[str, Any] = {"models": {n: os.path.basename(p) for n, p in recipe.models.items()},
                            "steps": [{k: v for k, v in asdict(s).items() if v is not None} for s in recipe.steps]}
    if recipe.dtype:
        data["dtype"] = recipe.dtype
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def parse_merge(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    recipe, rows, blocks = merge_recipe_from_form(form, files)
    name = one(form, "output")
    if not name:
        raise UsageError(None, "give the output a file name (name.safetensors)")
    output = files.output_beside(recipe.models["A"], name)
    step = recipe.steps[0]
    return (f"merge {step.method} -> {os.path.basename(output)}",
            {"inputs": {n: {"path": recipe.models[n], "size": rows[n]["size"], "mtime_ns": rows[n]["mtime_ns"]} for n in rows},
             "method": step.method, "alpha": step.alpha, "beta": step.beta, "seed": step.seed, "blocks": blocks,
             "te": step.te, "vae": step.vae, "exclude": step.exclude, "dtype": recipe.dtype,
             "output_path": output, "overwrite": flag(form, "overwrite")})


def run_merge(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.ops.merge.recipe import single_step_recipe
    from sdtk.ops.merge.run import run_recipe

    for item in p["inputs"].values():
        check_unchanged(item, item["path"])
    paths = [p["inputs"][n]["path"] for n in ("A", "B", "C") if n in p["inputs"]]
    recipe = single_step_recipe(paths, p["method"], p["alpha"], p["beta"], p["seed"], p["blocks"], p["te"], p["vae"],
                                p["exclude"], p["dtype"], None)
    result = run_recipe(recipe, p["output_path"], overwrite=p["overwrite"], hash_inputs=True,
                        on_start=lambda plan: ctx.progress(0, sum(t.nbytes for t in plan), "merging"),
                        on_tensor=lambda t, done: ctx.progress(done))
    for st in result.steps:
        ctx.log(f"{st['name']}: {st['method']}: {st['merged']} merged")
    return {"outputs": index_outputs(ctx, [result.output]), "recipe": recipe_yaml(recipe)}


# -- lora apply --------------------------------------------------------------------------------
MAX_LORAS = 6  # LoRA rows on the form (the CLI takes any number)
DORA_CONVENTIONS = ("comfyui", "lycoris")


def _strength(form: Form, key: str, default: Optional[float]) -> Optional[float]:
    import math

    value = number(form, key)
    if value is None:
        return default
    if not math.isfinite(value):
        raise UsageError(None, f"{key}: give a finite number")
    return value


def block_weights_text(text: str, what: str) -> Optional[str]:
    """The `lbw=` part of `LORA:S:lbw=...` from the form (a preset name, `lbw=...` or the bare list),
    checked with the CLI's parser; None when empty."""
    from sdtk.adapters.block_weights import parse_block_weights

    text = text.strip()
    if text.lower().startswith("lbw="):
        text = text[4:].strip()
    if not text:
        return None
    try:
        parse_block_weights(text)
    except UsageError as e:
        raise UsageError(None, f"{what}: {e.problem}") from None
    return text


def check_block_weights_fit(base: str, loras: List[Dict[str, Any]]) -> None:
    """Block weights the base's U-Net cannot take, refused in the page (reads the header only)."""
    from sdtk.adapters.block_weights import check_fits, parse_block_weights, unet_layout
    from sdtk.formats import open_model

    with open_model(base) as cat:
        layout = unet_layout(cat.tensors)
    for i, item in enumerate(loras):
        if item["lbw"]:
            try:
                check_fits(parse_block_weights(item["lbw"]), layout, os.path.basename(base))
            except UsageError as e:
                raise UsageError(None, f"{os.path.basename(item['path'])}: {e.problem}") from None


def parse_lora_apply(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    """`sdtk lora apply BASE LORA[:S[:TE]]... -o OUT`: base and LoRAs by library id, in order."""
    base_row, base = files.get(one(form, "base"), "base model")
    loras = []
    for i in range(MAX_LORAS):
        value = one(form, f"lora_{i}")
        if not value:
            continue
        row, real = files.get(value, f"LoRA {i + 1}")
        loras.append({"path": real, "size": row["size"], "mtime_ns": row["mtime_ns"],
                      "strength": _strength(form, f"strength_{i}", 1.0), "te_strength": _strength(form, f"te_strength_{i}", None),
                      "lbw": block_weights_text(one(form, f"lbw_{i}"), f"LoRA {i + 1}")})
    if not loras:
        raise UsageError(None, "choose at least one LoRA")
    if any(item["path"] == base for item in loras):
        raise UsageError(None, "the base model cannot also be one of the LoRAs")
    if any(item["lbw"] for item in loras):
        check_block_weights_fit(base, loras)
    dora = optional(form, "dora", DORA_CONVENTIONS) or "comfyui"
    name = one(form, "output")
    if not name:
        stems = "-".join(Path(item["path"]).stem for item in loras)[:120]
        name = f"{Path(base).stem}-{stems}.safetensors"
    output = files.output_beside(base, name)
    title = f"lora apply {', '.join(os.path.basename(item['path']) for item in loras)} -> {os.path.basename(output)}"
    return title, {"file_id": base_row["id"], "input_path": base, "size": base_row["size"], "mtime_ns": base_row["mtime_ns"],
                   "loras": loras, "allow_unmatched": flag(form, "allow_unmatched"), "dora": dora,
                   "output_path": output, "overwrite": flag(form, "overwrite")}


def run_lora_apply(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.adapters.block_weights import parse_block_weights
    from sdtk.adapters.matching import LoraInput
    from sdtk.ops.lora.bake import bake

    check_unchanged(p, p["input_path"])
    for item in p["loras"]:
        check_unchanged(item, item["path"])
    ctx.progress(0, 0, "matching the LoRAs to the base")
    specs = [LoraInput(item["path"], item["strength"], item["te_strength"],
                       parse_block_weights(item["lbw"]) if item.get("lbw") else None) for item in p["loras"]]
    result = bake(p["input_path"], specs, p["output_path"], allow_unmatched=p["allow_unmatched"], overwrite=p["overwrite"],
                  dora_convention=p["dora"],
                  on_start=lambda plan: ctx.progress(0, sum(t.nbytes for t in plan), "baking"),
                  on_tensor=lambda t, done: ctx.progress(done))
    ctx.log(f"wrote {os.path.basename(result.output)} ({result.tensors} tensors): {result.computed} changed, "
            f"{result.copied} copied unchanged")
    for rep in result.loras:
        kinds = ", ".join(f"{v} {k}" for k, v in rep.kinds.most_common())
        ctx.log(f"{os.path.basename(rep.file)} x{rep.strength:g} (te x{rep.te_strength:g}): "
                f"{rep.matched} of {rep.modules} modules ({kinds})")
        if rep.block_weights:
            ctx.log("  block weights: " + ", ".join(f"{b} x{v:g}" for b, v in rep.block_weights.items()) + " (other blocks x1)")
        if rep.unmatched:
            ctx.log(f"  skipped {len(rep.unmatched)}: " + ", ".join(f"{m} ({why})" for m, why in rep.unmatched[:5]))
    if result.overflow:
        ctx.log(f"warning: {sum(result.overflow.values())} values did not fit {len(result.overflow)} tensors' dtype")
    return {"outputs": index_outputs(ctx, [result.output]), "computed": result.computed, "copied": result.copied}


# -- lora merge, lora resize ----------------------------------------------------------------------
LORA_MERGE_DTYPES = ("fp32", "fp16", "bf16")  # `lora merge --dtype` (empty: the widest input's)
RESIZE_DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")  # `lora resize --dynamic METHOD:X` (kohya's conventions)


def _default_name(stems: Sequence[str], suffix: str) -> str:
    return "-".join(stems)[:120] + suffix


def parse_lora_merge(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    """`sdtk lora merge LORA[:WEIGHT]... -o OUT [--dtype D]`: two or more LoRAs by library id."""
    loras = []
    for i in range(MAX_LORAS):
        value = one(form, f"lora_{i}")
        if not value:
            continue
        row, real = files.get(value, f"LoRA {i + 1}")
        loras.append({"path": real, "size": row["size"], "mtime_ns": row["mtime_ns"],
                      "weight": _strength(form, f"weight_{i}", 1.0)})
    if len(loras) < 2:
        raise UsageError(None, "lora merge takes two or more LoRAs: choose at least two")
    if len({item["path"] for item in loras}) != len(loras):
        raise UsageError(None, "the same LoRA is chosen twice; give it one weight instead")
    name = one(form, "output") or _default_name([Path(item["path"]).stem for item in loras], "-merged.safetensors")
    output = files.output_beside(loras[0]["path"], name)
    if any(os.path.realpath(output) == item["path"] for item in loras):
        raise UsageError(None, "the output cannot be one of the LoRAs being merged")
    title = f"lora merge {', '.join(os.path.basename(item['path']) for item in loras)} -> {os.path.basename(output)}"
    return title, {"inputs": loras, "dtype": optional(form, "dtype", LORA_MERGE_DTYPES), "output_path": output,
                   "overwrite": flag(form, "overwrite")}


def run_lora_merge(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.ops.lora.merge import concat_merge

    for item in p["inputs"]:
        check_unchanged(item, item["path"])
    ctx.progress(0, 0, "reading the LoRAs")
    result = concat_merge([(item["path"], item["weight"]) for item in p["inputs"]], p["output_path"],
                          overwrite=p["overwrite"], out_dtype=p["dtype"],
                          on_start=lambda plan: ctx.progress(0, sum(t.nbytes for t in plan), "merging"),
                          on_tensor=lambda t, done: ctx.progress(done))
    ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(result.ranks.items()))
    ctx.log(f"wrote {os.path.basename(result.output)}: {result.modules} modules ({ranks}), exact (ranks concatenated, alpha = rank)")
    return {"outputs": index_outputs(ctx, [result.output]), "modules": result.modules,
            "ranks": {str(r): n for r, n in result.ranks.items()}}


def parse_lora_resize(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    """`sdtk lora resize LORA -o OUT --rank R [--dynamic METHOD:X]`."""
    import math

    row, real = files.get(one(form, "file"), "LoRA")
    try:
        rank = int(one(form, "rank"))
    except ValueError:
        raise UsageError(None, "rank: give a whole number (the new rank, or the cap with a dynamic method)") from None
    if rank < 1:
        raise UsageError(None, "--rank must be at least 1")
    method = optional(form, "dynamic", RESIZE_DYNAMIC)
    param = number(form, "dynamic_param")
    if method and (param is None or not math.isfinite(param)):
        raise UsageError(None, f"--dynamic {method}: give its number (e.g. {method}:{'0.9' if method != 'sv_ratio' else '2'})")
    name = one(form, "output") or f"{Path(real).stem}-rank{rank}" + (f"-{method}" if method else "") + ".safetensors"
    output = files.output_beside(real, name)
    if os.path.realpath(output) == real:
        raise UsageError(None, "the output cannot be the LoRA itself; give another name")
    return (f"lora resize {os.path.basename(real)} to rank {rank}" + (f" ({method} {param:g})" if method else ""),
            {"file_id": row["id"], "input_path": real, "size": row["size"], "mtime_ns": row["mtime_ns"], "rank": rank,
             "method": method, "param": param if method else 0.0, "output_path": output, "overwrite": flag(form, "overwrite")})


def run_lora_resize(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.ops.lora.resize import resize_file

    check_unchanged(p, p["input_path"])
    rows = resize_file(p["input_path"], p["output_path"], p["rank"], p["method"], p["param"], p["overwrite"],
                       on_module=lambda done, total: ctx.progress(done, total, f"factorizing module {done} of {total}"),
                       on_start=lambda plan: ctx.progress(0, sum(t.nbytes for t in plan), "writing"),
                       on_tensor=lambda t, done: ctx.progress(done))
    worst = min((r for *_, r in rows), default=1.0)
    ctx.log(f"wrote {os.path.basename(p['output_path'])}: {len(rows)} modules, ranks {sorted({k for _, _, k, _ in rows})}; "
            f"Frobenius norm retained: min {worst:.4f}")
    return {"outputs": index_outputs(ctx, [p["output_path"]]), "modules": len(rows), "retained_min": worst}


# -- scan, hash, index ---------------------------------------------------------------------------
def parse_file_only(op: str) -> Callable[[Form, Files], Tuple[str, Dict[str, Any]]]:
    def parse(form: Form, files: Files):
        row, real = files.get(one(form, "file"))
        return f"{op} {os.path.basename(real)}", {"file_id": row["id"], "input_path": real,
                                                 "size": row["size"], "mtime_ns": row["mtime_ns"]}
    return parse


def run_scan(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.scan import scan_file

    ctx.progress(0, 1, "checking without executing anything")
    result = scan_file(p["input_path"])
    ctx.log(f"{result.verdict}: {result.reason}")
    for f in result.findings:
        ctx.log(f"{f.verdict}: {f.message}")
    return {"verdict": result.verdict, "reason": result.reason}


def run_hash(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.formats import open_model
    from sdtk.hashing.model import cached_model_hashes

    check_unchanged(p, p["input_path"])
    try:
        cat = open_model(p["input_path"])
    except SdtkError as e:
        cat = None
        ctx.log(f"no content hash: {e.problem}")
    try:
        mh = cached_model_hashes(p["input_path"], cat, content=cat is not None, use_cache=False,
                                 on_progress=lambda done, total: ctx.progress(done, total, "hashing"))
    finally:
        if cat is not None:
            cat.close()
    hashes = {**mh.file.formatted("civitai"), "Content": (mh.content or "").upper() or None}
    row = ctx.conn.execute("SELECT sha256 FROM files WHERE id = ?", (p["file_id"],)).fetchone()
    same = row is not None and row["sha256"] == mh.file.sha256
    ctx.log("SHA256 matches the library's record" if same else "SHA256 differs from the library's record: re-index")
    return {"hashes": hashes, "matches_library": same}


def parse_index(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    return "index " + ", ".join(os.path.basename(r) or r for r in files.roots), {"roots": list(files.roots)}


def run_index(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    from sdtk.library.scan import scan_library

    seen = [0]

    def on_event(event, path):
        seen[0] += 1
        ctx.progress(seen[0], None, f"{seen[0]} files: {event} {os.path.basename(path)}")

    report = scan_library(ctx.conn, p["roots"], content=True, on_event=on_event,
                          on_progress=lambda path, done, total: ctx.check())
    ctx.progress(seen[0], max(seen[0], 1), f"{report.seen} files indexed")
    ctx.log(f"{report.seen} model files: new {report.new}, changed {report.changed}, unchanged {report.unchanged}, "
            f"missing {report.missing}; hashed {report.hashed}")
    for path, problem in report.problems:
        ctx.log(f"problem: {path}: {problem}")
    return {"seen": report.seen, "new": report.new, "problems": len(report.problems)}


def parse_diff(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    (ra, pa), (rb, pb) = files.get(one(form, "model_a"), "model A"), files.get(one(form, "model_b"), "model B")
    return (f"diff {os.path.basename(pa)} vs {os.path.basename(pb)}",
            {"file_ids": [ra["id"], rb["id"]], "inputs": [{"path": pa, "size": ra["size"], "mtime_ns": ra["mtime_ns"]},
                                                         {"path": pb, "size": rb["size"], "mtime_ns": rb["mtime_ns"]}]})


def run_diff(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    """`sdtk diff A B`: per-block and per-component similarity (shown beside the block sliders)."""
    from sdtk.formats import open_model
    from sdtk.ops.merge.diff import diff_models

    for item in p["inputs"]:
        check_unchanged(item, item["path"])
    with open_model(p["inputs"][0]["path"]) as ca, open_model(p["inputs"][1]["path"]) as cb:
        done = [0]
        ctx.progress(0, ca.tensor_bytes, "comparing")

        def on_tensor(n):
            done[0] += n
            ctx.progress(done[0])

        result = diff_models(ca, cb, on_tensor=on_tensor)
    t = result.total
    ctx.log(f"cosine {t['cosine']:.6f}, relative L2 {t['relative_l2']:.6f}")
    return {"total": t, "blocks": result.blocks, "components": result.components}


def parse_verify(form: Form, files: Files) -> Tuple[str, Dict[str, Any]]:
    (ra, pa), (rb, pb) = files.get(one(form, "model_a"), "model A"), files.get(one(form, "model_b"), "model B")
    return (f"verify {os.path.basename(pb)} = {os.path.basename(pa)} at another precision",
            {"file_ids": [ra["id"], rb["id"]], "inputs": [{"path": pa, "size": ra["size"], "mtime_ns": ra["mtime_ns"]},
                                                         {"path": pb, "size": rb["size"], "mtime_ns": rb["mtime_ns"]}]})


def run_verify(ctx, p: Dict[str, Any]) -> Dict[str, Any]:
    """Every tensor of B equals A's cast to B's dtype (sdtk.library.precision_dupes, sample=None)."""
    from sdtk.library.precision_dupes import same_weights

    for item in p["inputs"]:
        check_unchanged(item, item["path"])
    a, b = p["inputs"][0]["path"], p["inputs"][1]["path"]
    check = same_weights(a, b, sample=None, on_tensor=lambda done, total: ctx.progress(done, total, "comparing tensors"))
    if check.same:
        ctx.log(f"the same weights: all {check.total} tensors of {os.path.basename(b)} are {os.path.basename(a)}'s, cast")
    else:
        ctx.log(f"not the same weights ({check.reason}; {check.checked} of {check.total} tensors compared)")
    return {"verdict": "same weights" if check.same else "different", "reason": check.reason or f"{check.total} tensors compared"}


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    parse: Callable[[Form, Files], Tuple[str, Dict[str, Any]]]
    run: Callable[[Any, Dict[str, Any]], Dict[str, Any]]
    writes: bool  # writes a model file (shown with its output in the library)


OPERATIONS: Dict[str, Operation] = {op.name: op for op in (
    Operation("convert", "Convert", parse_convert, run_convert, True),
    Operation("merge", "Merge", parse_merge, run_merge, True),
    Operation("lora-apply", "Bake LoRAs", parse_lora_apply, run_lora_apply, True),
    Operation("lora-merge", "Merge LoRAs", parse_lora_merge, run_lora_merge, True),
    Operation("lora-resize", "Resize a LoRA", parse_lora_resize, run_lora_resize, True),
    Operation("scan", "Safety scan", parse_file_only("scan"), run_scan, False),
    Operation("hash", "Hash", parse_file_only("hash"), run_hash, False),
    Operation("index", "Index the folders", parse_index, run_index, False),
    Operation("diff", "Compare per block", parse_diff, run_diff, False),
    Operation("verify", "Verify same weights", parse_verify, run_verify, False),
)}

# "What to do" advice (identify/advice.py codes) -> a one-click job: (operation, form values, label key in ui_text)
ADVICE_ACTIONS: Dict[str, Tuple[str, Dict[str, str], str]] = {
    "training_checkpoint": ("convert", {"preset": "generation"}, "advice.convert_generation"),
    "shrink_for_generation": ("convert", {"preset": "generation"}, "advice.convert_generation"),
    "convert_to_safetensors": ("convert", {}, "advice.convert_safetensors"),
    "fix_clip": ("convert", {"fix_clip": "1"}, "advice.fix_clip"),
}
