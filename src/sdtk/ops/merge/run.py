"""Running a recipe: find and open the inputs, refuse incompatible ones before any work, build
the sources, hash the inputs (in a background thread, while the merge is written), write the
output atomically with its metadata (A1111's sd_merge_recipe / sd_merge_models and our full
recipe `sdtk.merge_recipe`)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from sdtk.errors import SdtkError, UsageError
from sdtk.fileio import check_output_path
from sdtk.formats import open_model
from sdtk.formats.diffusers import folder_header_sha256, folder_size, is_diffusers_folder
from sdtk.quant.views import align_names, dequantize_catalogue
from sdtk.ops.merge.arch import FIRST_CONV, check_compatible, describe
from sdtk.ops.merge.plan import FileSource, StepSource, output_plan
from sdtk.ops.merge.recipe import Recipe, dumps_canonical

RECIPE_KEY = "sdtk.merge_recipe"
FACTS_KEY = "sdtk.model_facts"  # what sdtk knew of the merged model, guesses with their confidence
# A1111 interp_method names (modules/extras.py run_modelmerger), ours for the methods it lacks.
A1111_METHOD_NAMES = {"weighted-sum": "Weighted sum", "add-difference": "Add difference"}


def legacy_hash(path: str) -> str:
    """A1111's old model hash (AutoV1): sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def header_sha256(path: str) -> str:
    """SHA256 of a safetensors header (names, shapes, dtypes, metadata): a quick identity."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        data = head + (f.read(n) if n < (100 << 20) else b"")
    return hashlib.sha256(data).hexdigest()


def folder_lineage(path: str) -> Dict[str, str]:
    """What a merge records of a diffusers folder input: its content hash v2 (under single-file
    names; a folder has no file SHA256/AutoV3 of its own)."""
    from sdtk.hashing.content import content_hash_v2

    with open_model(path) as cat:
        return {"content_v2": content_hash_v2(cat)}


def input_kinds(path: str):
    return ("content_v2",) if is_diffusers_folder(path) else LINEAGE_KINDS


def default_workers() -> int:
    """Threads computing chunks of one tensor (numpy releases the GIL): the cores, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def _placeholder(i: int, kind: str = "sha256") -> str:
    return f"{'sdtk-pending-' + kind + '-' + str(i):-<64}"


LINEAGE_KINDS = ("sha256", "autov3", "content_v2")  # recorded per input (sdtk.hashing.model.lineage_hashes)


@dataclass
class MergeResult:
    output: str
    bytes: int
    tensors: int
    steps: List[dict]
    models: Dict[str, dict]
    family: Optional[str]
    metadata: Dict[str, str] = field(default_factory=dict)
    sidecar: Optional[str] = None  # the A1111 <name>.yaml written beside the output
    facts: Optional[dict] = None  # what is known of the merged model (sdtk.identify.facts)
    to: str = "safetensors"
    quant: Optional[str] = None
    ggml_types: Dict[str, int] = field(default_factory=dict)  # --to gguf: ggml type -> tensors
    notes: List[str] = field(default_factory=list)


def _find_model(name: str, path: str, identity: dict, search_dirs: List[str]) -> str:
    if path and os.path.exists(path):
        return path
    base = os.path.basename(path) if path else identity.get("file", "")
    for d in search_dirs:
        cand = os.path.join(d, base)
        if base and os.path.exists(cand):
            return cand
    where = ", ".join(search_dirs) or "."
    raise SdtkError(path or base or name, f"model {name!r} not found (looked in {where}; pass --model {name}=PATH)")


class _Hasher(threading.Thread):
    """Hashes the inputs in the background while the merge is written (hashlib and blake3 release
    the GIL): SHA256, AutoV3 and content hash v2 of each, one sequential read per input (the
    hash cache answers for files hashed before by any sdtk command)."""

    def __init__(self, paths: List[str]):
        super().__init__(daemon=True, name="sdtk-merge-hash")
        self.paths, self.results, self.error = paths, {}, None
        self._cancelled = threading.Event()

    def run(self):
        try:
            from sdtk.hashing.filehash import HashingCancelled
            from sdtk.hashing.model import lineage_hashes

            for p in self.paths:
                if p not in self.results and not self._cancelled.is_set():
                    try:
                        self.results[p] = (folder_lineage(p) if is_diffusers_folder(p)
                                           else lineage_hashes(p, cancelled=self._cancelled.is_set))
                    except HashingCancelled:
                        return
        except BaseException as e:  # reported by the caller
            self.error = e

    def cancel(self):
        self._cancelled.set()


def run_recipe(recipe: Recipe, dest: str, overwrite: bool = False, hash_inputs: bool = True,
               search_dirs: Optional[List[str]] = None, on_start: Optional[Callable] = None,
               on_tensor: Optional[Callable] = None, workers: int = 0, sidecar: bool = True,
               to: Optional[str] = None, quant: Optional[str] = None) -> MergeResult:
    """Evaluate `recipe` into `dest`. Everything that can be refused is refused before writing.
    `to`: "safetensors" (default), "gguf" (with `quant`: the diffusion model as city96 writes it,
    no safetensors metadata, no input hashes) or "fp8-scaled" (ComfyUI's per-layer form)."""
    from sdtk.ops.quantized_output import check_target, write_plan

    recipe.validate()
    to = check_target(to, quant, dest)
    if to == "gguf":
        hash_inputs, sidecar = False, False  # a GGUF file carries no metadata to record them in
    search_dirs = search_dirs or []
    paths = {n: _find_model(n, p, recipe.identities.get(n, {}), search_dirs) for n, p in recipe.models.items()}
    if recipe.bake_vae:
        paths[BAKE] = _find_model("bake_vae", recipe.bake_vae, recipe.identities.get(BAKE, {}), search_dirs)
    check_output_path(dest, paths.values(), overwrite)
    stored_hashes = any(k in recipe.identities.get(n, {}) for n in recipe.models for k in ("sha256", "content_v2"))
    if recipe.identities and stored_hashes != hash_inputs and to != "gguf":
        raise UsageError(None, "the stored recipe was made " + ("with" if stored_hashes else "without")
                         + " input hashes; " + ("drop --no-hash" if stored_hashes else "pass --no-hash") + " to reproduce it")
    cats: Dict[str, object] = {}
    hasher = _Hasher(list(paths.values())) if hash_inputs else None
    try:
        sources: Dict[str, object] = {}
        for name, path in paths.items():
            cats[name] = dequantize_catalogue(open_model(path))  # quantized inputs (GGUF, fp8-scaled, NF4): their values
        primary = next((n for n in recipe.steps[0].inputs if n in cats), None)
        for name, cat in cats.items():
            if name not in (primary, BAKE) and primary is not None:
                align_names(cat, cats[primary].tensors)  # a GGUF file beside a checkpoint: the primary's names
        for name, path in paths.items():
            cat = cats[name]
            sources[name] = FileSource(path, cat, *describe(cat)) if name != BAKE else FileSource(path, cat, None)
        identities = _quick_identities(paths, recipe.identities, hash_inputs)
        steps = _build_steps(recipe, sources)
        final = steps[-1]
        plan = output_plan(final, recipe.dtype, sources.get(BAKE), workers=workers or default_workers())
        metadata = _metadata(recipe, recipe.canonical(identities), cats, identities, paths, final)
        facts = _merged_facts(recipe, cats, paths)
        metadata.update(_facts_metadata(facts, "merge of " + " + ".join(identities[n]["file"].rsplit(".", 1)[0] for n in recipe.models)))
        if on_start is not None:
            on_start(plan)
        written = {}

        def final_metadata() -> Dict[str, str]:
            written["metadata"] = _with_hashes(metadata, hasher, paths, identities, recipe.identities) if hasher else metadata
            return written["metadata"]

        if hasher is not None:
            hasher.start()
        from sdtk.fileio import AtomicOutput, all_or_nothing
        from sdtk.ops.sidecar import sidecar_for, sidecar_path

        decision = sidecar_for(facts) if sidecar else None
        yaml_path = None
        with all_or_nothing():  # the merge and its yaml appear together, or neither
            written_file = write_plan(plan, dest, to, quant, metadata, inputs=list(paths.values()), overwrite=overwrite,
                                      on_tensor=on_tensor, final_metadata=final_metadata if hasher else None,
                                      label=paths[primary] if primary else None)
            if decision is not None and decision.text:
                yaml_path = sidecar_path(Path(dest))
                with AtomicOutput(yaml_path, inputs=list(paths.values()), overwrite=overwrite) as f:
                    f.write(decision.text.encode("utf-8"))
        return MergeResult(os.fspath(dest), written_file.bytes, written_file.tensors, [s.report.as_dict() for s in steps],
                           identities, final.family, written.get("metadata", metadata), str(yaml_path) if yaml_path else None,
                           facts.as_record(), to, quant, written_file.types, written_file.notes)
    finally:
        if hasher is not None:
            hasher.cancel()
        for cat in cats.values():
            cat.close()


BAKE = "__bake_vae__"  # the name of the --bake-vae file among the recipe's inputs


def _quick_identities(paths: Dict[str, str], stored: Dict[str, dict], hash_inputs: bool) -> Dict[str, dict]:
    """{file, size, sha256 placeholder | header_sha256} per input; a stored recipe's size and
    header hash are checked now (its sha256 when the hashes are known, at the end)."""
    identities = {}
    for i, (name, path) in enumerate(paths.items()):
        folder = is_diffusers_folder(path)
        ident = {"file": os.path.basename(os.path.normpath(path)), "size": folder_size(path) if folder else os.path.getsize(path)}
        if folder:
            ident["folder"] = "diffusers"
        if hash_inputs:
            for kind in input_kinds(path):
                ident[kind] = _placeholder(i, kind)
        else:
            ident["header_sha256"] = folder_header_sha256(path) if folder else header_sha256(path)
        for k in ("size", "header_sha256"):
            if k in stored.get(name, {}) and stored[name][k] != ident.get(k):
                raise SdtkError(path, f"is not the file the recipe was made from ({k} differs)")
        identities[name] = ident
    return identities


def _build_steps(recipe: Recipe, sources: Dict[str, object]) -> List[StepSource]:
    """One StepSource per step; each step's inputs are checked for compatibility first."""
    steps: List[StepSource] = []
    for i, step in enumerate(recipe.steps):
        inputs = [sources[n] for n in step.inputs]
        check_compatible([s.label for s in inputs], [s.family for s in inputs],
                         [{k: v[0] for k, v in s.entries.items()} for s in inputs], [s.title for s in inputs])
        steps.append(StepSource(step.name or f"step{i + 1}", step.method, inputs, step.alpha, step.beta, step.seed,
                                blocks=step.blocks, te=step.te, vae=step.vae, exclude=step.exclude))
        if step.name:
            sources[step.name] = steps[-1]
    return steps


def _with_hashes(metadata: Dict[str, str], hasher: _Hasher, paths: Dict[str, str], identities, stored) -> Dict[str, str]:
    """The metadata with the real sha256s in place of the placeholders (same length)."""
    hasher.join()
    if hasher.error is not None:
        raise SdtkError(None, f"hashing the inputs failed: {hasher.error}")
    text = dict(metadata)
    for i, (name, path) in enumerate(paths.items()):
        found = hasher.results[path]
        for kind in found:
            real, want = found[kind], stored.get(name, {}).get(kind)
            if kind in ("sha256", "content_v2") and want and want != real:
                raise SdtkError(path, f"is not the model the recipe was made from ({kind} {real[:12]} != {want[:12]})")
        for kind in input_kinds(path):
            identities[name][kind] = found[kind]
            text = {k: v.replace(_placeholder(i, kind), found[kind]) for k, v in text.items()}
    return text


def _metadata(recipe: Recipe, canonical: dict, cats, identities, paths, final) -> Dict[str, str]:
    """A1111-compatible merge metadata plus our full recipe."""
    last = recipe.steps[-1]

    def hash_of(name):
        ident = identities.get(name)
        return (ident.get("sha256") or ident.get("content_v2") or ident.get("header_sha256")) if ident else None

    a1111_hashes = [hash_of(n) for n in last.inputs] + [None] * (3 - len(last.inputs))
    primary_shape = final.entries.get(FIRST_CONV, ((0, 0),))[0]
    channels = primary_shape[1] if len(primary_shape) > 1 else 0
    dtype_name = (recipe.dtype or "").lower()
    sd_merge_recipe = {
        "type": "sdtk",  # A1111 writes "webui"; the fields below are A1111's
        "primary_model_hash": a1111_hashes[0],
        "secondary_model_hash": a1111_hashes[1],
        "tertiary_model_hash": a1111_hashes[2],
        "interp_method": A1111_METHOD_NAMES.get(last.method, last.method),
        "multiplier": last.alpha,
        "save_as_half": dtype_name in ("fp16", "float16", "half"),
        "custom_name": "",
        "config_source": 0,
        "bake_in_vae": identities[BAKE]["file"] if BAKE in identities else "None",
        "discard_weights": last.exclude or "",
        "is_inpainting": channels == 9,
        "is_instruct_pix2pix": channels == 8,
    }
    models: Dict[str, dict] = {}
    for name in recipe.models:  # A1111 run_modelmerger add_model_metadata: the entry, then its own sd_merge_models
        meta = cats[name].metadata
        legacy = None if is_diffusers_folder(paths[name]) else legacy_hash(paths[name])  # a folder has no file
        models[hash_of(name)] = {"name": identities[name]["file"], "legacy_hash": legacy,
                                 "sd_merge_recipe": json.loads(meta["sd_merge_recipe"]) if _is_json(meta.get("sd_merge_recipe")) else None}
        nested = json.loads(meta["sd_merge_models"]) if _is_json(meta.get("sd_merge_models")) else None
        if isinstance(nested, dict):
            models.update(nested)
    return {
        "format": "pt",
        "sd_merge_recipe": json.dumps(sd_merge_recipe, ensure_ascii=False),
        "sd_merge_models": json.dumps(models, ensure_ascii=False),
        RECIPE_KEY: dumps_canonical(canonical),
    }


def _merged_facts(recipe: Recipe, cats, paths):
    """The facts convert would write, for the merge: each input's (markers, metadata, the yaml
    beside it, shapes) combined by sdtk.identify.facts.merged_facts."""
    from sdtk.identify.config_yaml import read_config_beside
    from sdtk.identify.facts import merged_facts
    from sdtk.ops.model_facts import model_facts

    return merged_facts([model_facts(cats[name], config=read_config_beside(paths[name])) for name in recipe.models])


def _facts_metadata(facts, title: str) -> Dict[str, str]:
    """ModelSpec keys of high confidence only (as convert writes them) and our own record. The
    title names the inputs, not the output file, so `--recipe-from` reproduces the same bytes."""
    from sdtk.ops import lineage as lin

    spec = lin.modelspec_additions({}, facts.modelspec_architecture, title, facts.modelspec_prediction, False)
    spec[FACTS_KEY] = json.dumps(facts.as_record(), separators=(",", ":"))
    return spec


def _is_json(text) -> bool:
    if not isinstance(text, str):
        return False
    try:
        json.loads(text)
        return True
    except ValueError:
        return False

