"""Fixtures for the convert tests: scaled-down random-valued files built from the real layouts."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from sdtk.formats.safetensors import write_safetensors
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import from_array


def write_layout(path: Path, layout, scale: int = 8, seed: int = 0, metadata: Optional[Dict[str, str]] = None,
                 values: str = "random") -> Path:
    layout = load_layout(layout) if isinstance(layout, str) else layout
    write_safetensors(path, layout_plan(layout, values=values, seed=seed, scale=scale), metadata or {}, overwrite=True)
    return path


def write_tensors(path: Path, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> Path:
    write_safetensors(path, [from_array(k, v) for k, v in tensors.items()], metadata or {}, overwrite=True)
    return path


def read_all(path: Path) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file. The reference `safetensors` library must open it and
    list the same names; values come through it (numpy) when numpy has the dtype, else through
    sdtk's reader (bf16/fp8, which safetensors' numpy backend cannot return)."""
    from safetensors import safe_open
    from sdtk.formats import open_model

    with safe_open(str(path), "np") as f:
        names = set(f.keys())
        out = {}
        with open_model(path) as cat:
            assert set(cat.tensors) == names
            for name, t in cat.tensors.items():
                if t.dtype.name in ("F32", "F16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"):
                    out[name] = f.get_tensor(name)
                else:
                    out[name] = np.array(t.read())
    return out


def metadata_of(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_in(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def planned_outputs(src: Path, folder: Path, **options):
    """What `sdtk convert` writes for `src` (every output's header: names, shapes, dtypes and
    metadata, exactly as convert plans them; values zero, each file sparse): full-size outputs
    in milliseconds. Returns the Conversion (its outputs' `dest` are the files)."""
    import contextlib

    from sdtk.fileio import AtomicOutput
    from sdtk.formats import open_model
    from sdtk.formats.safetensors import build_header
    from sdtk.ops.convert import ConvertOptions, _metadata_for, choose_destinations, plan_conversion, resolve_options

    options.setdefault("source_hashes", False)
    opts = resolve_options(ConvertOptions(**options))
    with contextlib.ExitStack() as stack, open_model(src) as cat:
        conv = plan_conversion(cat, opts, stack)
        choose_destinations(conv, None, folder, opts)
        for out in conv.outputs:
            header = build_header(out.plan, _metadata_for(cat, conv, out, opts, {}))
            with AtomicOutput(out.dest, overwrite=opts.overwrite) as f:
                f.write(header)
                f.truncate(len(header) + sum(t.nbytes for t in out.plan))
        return conv
