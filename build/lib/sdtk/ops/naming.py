"""Output names that say what was done and never collide with an existing file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence


def tagged_name(source: Path, tags: Sequence[str], suffix: str = ".safetensors") -> str:
    """`model.ckpt` + ["fp16", "pruned"] -> `model-fp16-pruned.safetensors` (tags already in the
    name are not repeated: `v1-5-pruned` + pruned stays `v1-5-pruned`)."""
    stem = source.name
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    parts = stem.lower().replace("_", "-").split("-")
    extra = [t for t in tags if t and t.lower() not in parts]
    return "-".join([stem, *extra]) + suffix


def free_path(candidate: Path, taken: Iterable[Path] = ()) -> Path:
    """`candidate`, or `name-2.ext`, `name-3.ext`, ... : the first that does not exist and is not
    in `taken` (outputs already planned in this run)."""
    taken = {os.path.abspath(p) for p in taken}
    if not candidate.exists() and os.path.abspath(candidate) not in taken:
        return candidate
    stem, suffix = candidate.name[: -len(candidate.suffix)] if candidate.suffix else candidate.name, candidate.suffix
    n = 2
    while True:
        p = candidate.with_name(f"{stem}-{n}{suffix}")
        if not p.exists() and os.path.abspath(p) not in taken:
            return p
        n += 1


def default_output(source: Path, tags: Sequence[str], folder: Optional[Path] = None, overwrite: bool = False,
                   taken: Iterable[Path] = ()) -> Path:
    """Where the converted file goes when the user gave no name: beside the input (or in `folder`),
    tagged with what was done. Never the input itself; an existing file is kept unless `overwrite`."""
    folder = folder if folder is not None else source.parent
    candidate = folder / tagged_name(source, tags)
    if candidate.exists() and os.path.exists(source) and os.path.samefile(candidate, source):
        candidate = folder / tagged_name(source, list(tags) + ["converted"])
    if overwrite and os.path.abspath(candidate) not in {os.path.abspath(p) for p in taken}:
        return candidate
    return free_path(candidate, taken)
