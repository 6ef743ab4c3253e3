"""diffusers pipeline folders, read lazily: `model_index.json` + one folder per component, each
with `config.json` and its weights (safetensors, sharded safetensors with their index, `.bin`
through sdtk's restricted pickle reader, `*.fp16.*` variants). Opened as one catalogue under
single-file (LDM/SAI/BFL) names (the key maps are architectures.diffusers_keys), or component by
component (`read_components`). A component that model_index.json lists but that is missing or
incomplete is refused by name: nothing is loaded half.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from sdtk.errors import FormatError, UnsupportedFormatError
from sdtk.formats.catalogue import Catalogue
from sdtk.tensors import LazyTensor

SIDECAR = "sdtk_extra.safetensors"  # tensors diffusers does not keep; diffusers ignores the file
SIDECAR_KEY = "sdtk.diffusers"  # its metadata: original key order, metadata, prefixes, created tensors
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
# STEM[-0000N-of-0000M][.VARIANT].EXT[.index[.VARIANT].json] (diffusers/transformers file names)
_WEIGHT_NAME = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:-\d+-of-\d+)?(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                          r"\.(?:safetensors|bin)(?:\.index(?:\.(?P<ivariant>[A-Za-z0-9_]+))?\.json)?$")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",), ("spiece.model",))


def is_diffusers_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def _folder_files(path: str) -> List[str]:
    """Every file under a folder (relative paths, sorted), hidden ones (temporaries) left out."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.relpath(os.path.join(root, f), path) for f in files if not f.startswith(".")]
    return sorted(out)


def folder_size(path: str) -> int:
    """Bytes of every file in the folder (what it takes on disk, as a file's size would)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in _folder_files(path))


def folder_header_sha256(path: str) -> str:
    """A quick identity of a folder without reading its tensors (merge --no-hash records it, as
    it records a file's header hash): sha256 over each file's relative path and size, its
    safetensors header for .safetensors files and its bytes for small JSON/text files."""
    import hashlib
    import struct

    h = hashlib.sha256(b"sdtk-folder-header-v1\n")
    for rel in _folder_files(path):
        full = os.path.join(path, rel)
        size = os.path.getsize(full)
        h.update(rel.encode("utf-8") + b"\x00" + str(size).encode("ascii") + b"\x00")
        with open(full, "rb") as fh:
            if rel.endswith(".safetensors"):
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                h.update(head + (fh.read(n) if n < (100 << 20) else b""))
            elif size <= (4 << 20) and rel.endswith((".json", ".txt")):
                h.update(fh.read())
    return h.hexdigest()


def _json(path: str, what: str, folder: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise FormatError(folder, f"{what} is missing") from None
    except (OSError, ValueError) as e:
        raise FormatError(folder, f"{what} is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise FormatError(folder, f"{what} is not a JSON object")
    return obj


@dataclass
class ComponentFiles:
    name: str
    config: dict
    tensors: Dict[str, LazyTensor]
    files: List[str]
    catalogues: List[Catalogue] = field(default_factory=list)


def _open_weights(folder: str, comp: str, variant: Optional[str]) -> Tuple[Dict[str, LazyTensor], List[str], List[Catalogue]]:
    from sdtk.formats import open_model

    sub = os.path.join(folder, comp)
    names = set(os.listdir(sub))
    found = {m.group("variant") or m.group("ivariant") for n in names if (m := _WEIGHT_NAME.match(n))}
    variants = [variant] if variant else [None] + sorted(v for v in found if v)
    for var in variants:
        tag = f".{var}" if var else ""
        for stem in WEIGHT_STEMS:
            for ext in ("safetensors", "bin"):
                single = f"{stem}{tag}.{ext}"
                # sharded: diffusers writes STEM.EXT.index.VARIANT.json; transformers STEM.EXT.index.json
                for index in (f"{stem}.{ext}.index{tag}.json", f"{stem}{tag}.{ext}.index.json"):
                    if index in names:
                        return _open_sharded(folder, comp, index)
                if single in names:
                    cat = open_model(os.path.join(sub, single))
                    return dict(cat.tensors), [os.path.join(sub, single)], [cat]
    raise FormatError(folder, f"component {comp!r} (listed in model_index.json) has no weights file in {comp}/")


def _open_sharded(folder: str, comp: str, index_name: str):
    from sdtk.formats import open_model

    sub = os.path.join(folder, comp)
    index = _json(os.path.join(sub, index_name), f"{comp}/{index_name}", folder)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(folder, f"{comp}/{index_name} has no weight_map")
    by_shard: Dict[str, set] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.sep in shard or shard.startswith("."):
            raise FormatError(folder, f"{comp}/{index_name}: bad shard name {shard!r}")
        by_shard.setdefault(shard, set()).add(key)
    tensors: Dict[str, LazyTensor] = {}
    files, cats = [], []
    try:
        for shard in sorted(by_shard):
            path = os.path.join(sub, shard)
            if not os.path.isfile(path):
                raise FormatError(folder, f"{comp}/{shard} (named by {index_name}) is missing")
            cat = open_model(path)
            cats.append(cat)
            files.append(path)
            if set(cat.tensors) != by_shard[shard]:
                extra = sorted(set(cat.tensors) - by_shard[shard])
                lack = sorted(by_shard[shard] - set(cat.tensors))
                what = f"holds {extra[0]!r} that the index puts elsewhere" if extra else f"lacks {lack[0]!r}"
                raise FormatError(folder, f"{comp}/{shard} disagrees with {index_name}: it {what}")
            tensors.update(cat.tensors)
    except BaseException:
        for c in cats:
            c.close()
        raise
    return tensors, files, cats


def _check_support_folder(folder: str, comp: str, kind: str) -> None:
    sub = os.path.join(folder, comp)
    if not os.path.isdir(sub):
        raise FormatError(folder, f"component {comp!r} is listed in model_index.json but its folder is missing "
                                  "(diffusers would build an empty tokenizer without a word)")
    names = set(os.listdir(sub))
    if kind == "tokenizer" and not any(all(f in names for f in group) for group in TOKENIZER_FILES):
        raise FormatError(folder, f"{comp}/ is incomplete: no vocab.json + merges.txt, tokenizer.json or spiece.model")
    if kind == "scheduler" and "scheduler_config.json" not in names:
        raise FormatError(folder, f"{comp}/ is incomplete: no scheduler_config.json")


@dataclass
class DiffusersFolder:
    path: str
    index: dict
    family: str
    components: Dict[str, ComponentFiles]
    sidecar: Optional[Catalogue]
    sidecar_info: dict
    scheduler: dict
    ignored: List[str]  # listed components a single file does not hold (safety checker, ...)

    def close(self) -> None:
        for comp in self.components.values():
            for c in comp.catalogues:
                c.close()
        if self.sidecar is not None:
            self.sidecar.close()

    @property
    def file_size(self) -> int:
        files = [f for c in self.components.values() for f in c.files]
        return sum(os.path.getsize(f) for f in files) + (self.sidecar.file_size if self.sidecar else 0)


def _family_of(folder: str, index: dict) -> str:
    from sdtk.architectures.diffusers_keys.pipelines import PIPELINE_FAMILY, PIPELINES

    cls = index.get("_class_name")
    family = PIPELINE_FAMILY.get(cls) if isinstance(cls, str) else None
    if family is None:
        known = ", ".join(sorted(PIPELINE_FAMILY))
        raise UnsupportedFormatError(folder, f"pipeline {cls!r} has no single-file layout in sdtk (it reads {known})")
    listed = lambda name: isinstance(index.get(name), list) and index[name][:1] != [None]
    if family in ("sd1", "sd2"):
        te = os.path.join(folder, "text_encoder", "config.json")
        act = _json(te, "text_encoder/config.json", folder).get("hidden_act") if listed("text_encoder") else None
        family = "sd2" if act == "gelu" else "sd1"  # OpenCLIP-H (SD2) uses gelu, CLIP-L quick_gelu (reference 2.4)
    if family == "sdxl-refiner" and listed("text_encoder"):
        family = "sdxl"  # an SDXL base folder saved with the img2img pipeline
    assert family in PIPELINES
    return family


def read_components(path: str, variant: Optional[str] = None) -> DiffusersFolder:
    """Open every component a folder's model_index.json lists (lazily); refuse missing ones."""
    from sdtk.architectures.diffusers_keys.pipelines import PIPELINES
    from sdtk.formats.safetensors import read_safetensors

    path = os.fspath(path)
    index = _json(os.path.join(path, "model_index.json"), "model_index.json", path)
    family = _family_of(path, index)
    spec = PIPELINES[family]
    model_folders = {c.folder for c in spec.components}
    comps: Dict[str, ComponentFiles] = {}
    ignored: List[str] = []
    folder = DiffusersFolder(path, index, family, comps, None, {}, {}, ignored)
    try:
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
                continue
            if name in model_folders:
                sub = os.path.join(path, name)
                if not os.path.isdir(sub):
                    raise FormatError(path, f"component {name!r} is listed in model_index.json but its folder is missing")
                config = _json(os.path.join(sub, "config.json"), f"{name}/config.json", path)
                tensors, files, cats = _open_weights(path, name, variant)
                comps[name] = ComponentFiles(name, config, tensors, files, cats)
            elif name.startswith("tokenizer"):
                _check_support_folder(path, name, "tokenizer")
            elif name == "scheduler":
                _check_support_folder(path, name, "scheduler")
                folder.scheduler = _json(os.path.join(path, name, "scheduler_config.json"), "scheduler/scheduler_config.json", path)
            else:
                ignored.append(name)
        if not comps:
            raise FormatError(path, "model_index.json lists no model component sdtk can read")
        side = os.path.join(path, SIDECAR)
        if os.path.isfile(side):
            folder.sidecar = read_safetensors(side)
            raw = folder.sidecar.metadata.get(SIDECAR_KEY, "{}")
            try:
                folder.sidecar_info = json.loads(raw)
            except ValueError:
                raise FormatError(side, f"{SIDECAR_KEY} metadata is not JSON") from None
    except BaseException:
        folder.close()
        raise
    return folder


def read_diffusers_folder(path: str, variant: Optional[str] = None) -> Catalogue:
    """A diffusers folder as one lazy catalogue under single-file names (what A1111/ComfyUI load)."""
    from sdtk.architectures.diffusers_keys.assemble import ComponentError, join_component, regenerated
    from sdtk.architectures.diffusers_keys.pipelines import PIPELINES, UNET_PREFIX

    folder = read_components(path, variant)
    try:
        spec = PIPELINES[folder.family]
        info = folder.sidecar_info
        prefixes: Dict[str, str] = {}
        tensors: List[LazyTensor] = []
        only_dit = set(folder.components) <= {"transformer"}
        for comp in spec.components:
            files = folder.components.get(comp.folder)
            if files is None:
                continue
            default = comp.prefixes[0]
            if comp.prefixes[0] == "" and not only_dit:
                default = UNET_PREFIX  # an all-in-one file keeps its DiT under model.diffusion_model.
            prefix = info.get("prefixes", {}).get(comp.folder, default)
            prefixes[comp.folder] = prefix
            named = _hf_text_names(files.tensors) if comp.kind in ("clip-hf", "open-clip") else files.tensors
            try:
                tensors += join_component(comp, prefix, named, files.config, info.get("created", {}).get(comp.folder, ()))
            except ComponentError as e:
                raise FormatError(path, f"component {e.component!r}: {e.problem}") from None
        notes: List[str] = []
        if folder.sidecar is not None:
            tensors += list(folder.sidecar.tensors.values())
        else:
            made, notes = regenerated(folder.family, prefixes, {n: c.config for n, c in folder.components.items()},
                                      folder.scheduler)
            tensors += made
            if made:
                notes.append("recreated (exact): " + ", ".join(t.name for t in made))
        for name in folder.ignored:
            notes.append(f"{name}: not part of a single file; left out")
        by_name = {t.name: t for t in tensors}
        if len(by_name) != len(tensors):
            raise FormatError(path, "the sidecar and the components name the same tensor twice")
        order = info.get("order")
        if isinstance(order, list) and set(order) == set(by_name) and len(order) == len(by_name):
            by_name = {k: by_name[k] for k in order}
        elif folder.sidecar is not None:
            notes.append("the folder changed since sdtk wrote it: tensors are in component order, not the original order")
        meta = info.get("metadata") if isinstance(info.get("metadata"), dict) else {}
        cat = Catalogue(path=path, format="diffusers-folder", tensors=by_name, metadata=dict(meta),
                        file_size=folder.file_size, notes=notes)
        cat._closers.append(folder.close)
        return cat
    except BaseException:
        folder.close()
        raise


def _hf_text_names(tensors: Dict[str, LazyTensor]) -> Dict[str, LazyTensor]:
    """transformers >= 5.6 saves CLIPTextModel without the `text_model.` segment (reference 1.4):
    put it back, so both spellings read the same."""
    if any(k.startswith("text_model.") for k in tensors):
        return tensors
    return {(k if k == "text_projection.weight" else "text_model." + k): t for k, t in tensors.items()}
