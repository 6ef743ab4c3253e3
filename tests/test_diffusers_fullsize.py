"""Every shared layout at FULL size, single file -> diffusers folder -> single file, bit for bit.

The files are sparse (a header, then holes) so a 23 GB FLUX costs no disk: the tensors whose
values the conversion moves (qkv splits, uneven FLUX splits, transposes, scale/shift swaps, 1x1
conv <-> linear reshapes: one of each kind and size per component), and the first and last
tensor of the file, are filled with random values; the rest are zeros. Renamed tensors are copied
file to file and a sparse source's holes stay holes (`_copy_span`), so each layout takes seconds.
The back file is compared with the source over every byte that is data in either file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sdtk.architectures.diffusers_keys import components as rows
from sdtk.architectures.diffusers_keys.assemble import split_single_file
from sdtk.formats.safetensors import build_header, read_safetensors
from sdtk.ops.convert import ConvertOptions, resolve_options
from sdtk.ops.diffusers.convert import from_diffusers, to_diffusers
from sdtk.samples import layout_plan, load_layout

LAYOUT_FAMILY = {"sd15-full-ema": "sd1", "sd15-emaonly": "sd1", "sd15-inpainting": "sd1", "sd21-768-v": "sd2",
                 "sdxl-base": "sdxl", "sdxl-vpred-ztsnr": "sdxl", "flux1-dev": "flux1", "flux1-schnell": "flux1",
                 "flux1-dev-aio": "flux1", "sd3-medium-incl-clips": "sd3"}


MAX_FILLED = 64 << 20  # bytes of one filled tensor (FLUX's 132 MB linear1 weights: their bias stands in)


def _moved_tensors(plan, family):
    """Full names of the smallest tensor per (component, link kind, split sizes, rank), up to
    MAX_FILLED bytes: the values the conversion moves."""
    nbytes = {t.name: t.nbytes for t in plan}
    split = split_single_file({t.name: t for t in plan}, family)
    picked = {}
    for comp in split.components:
        for link in rows.links_from_single(comp.spec.kind, comp.single_shapes, comp.spec.options):
            if link.kind == "same":
                continue
            name = comp.prefix + link.single
            key = (comp.spec.folder, link.kind, link.sizes, len(comp.single_shapes[link.single]))
            size = nbytes[name]
            if size <= MAX_FILLED and (key not in picked or size < picked[key][1]):
                picked[key] = (name, size)
    return {name for name, _ in picked.values()}


def _random_values(t, rng) -> bytes:
    """Random bits; for floats the exponent's top bit cleared (finite values, no NaN or inf)."""
    raw = np.frombuffer(rng.bytes(t.nbytes), np.uint8).copy().reshape(-1, t.dtype.itemsize)
    if t.dtype.is_float:
        raw[:, -1] &= 0xBF  # little-endian: the last byte holds the sign and the exponent's top bits
    else:
        raw[:, 1:] = 0  # small non-negative integers
    return raw.tobytes()


def _sparse_source(path: Path, layout: str):
    plan = layout_plan(load_layout(layout))
    header = build_header(plan, {"modelspec.title": layout})
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + sum(t.nbytes for t in plan))
    filled = _moved_tensors(plan, LAYOUT_FAMILY[layout]) | {plan[0].name, plan[-1].name}
    rng = np.random.default_rng(11)
    cat = read_safetensors(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        for name in sorted(filled):
            t = cat.tensors[name]
            os.pwrite(fd, _random_values(t, rng), t.span.offset)
    finally:
        os.close(fd)
        cat.close()
    return filled


def _extents(path: Path):
    """(start, end) of every data (non-hole) range of a file."""
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def assert_same_bytes(a: Path, b: Path) -> None:
    """Byte equality of two (sparse) files, reading only what is data in either."""
    assert os.path.getsize(a) == os.path.getsize(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(_extents(a) + _extents(b)):
            for pos in range(start, end, 64 << 20):
                n = min(64 << 20, end - pos)
                fa.seek(pos)
                fb.seek(pos)
                assert fa.read(n) == fb.read(n), f"{b} differs from {a} in bytes {pos}..{pos + n}"


@pytest.mark.parametrize("layout", sorted(LAYOUT_FAMILY))
def test_full_size_round_trip_is_bit_identical(layout, tmp):
    src = tmp / "src.safetensors"
    filled = _sparse_source(src, layout)
    assert len(filled) >= 3
    opts = resolve_options(ConvertOptions(source_hashes=False))
    summary = to_diffusers(src, opts, tmp / "folder")
    assert summary["components"]
    back = tmp / "back.safetensors"
    from_diffusers(tmp / "folder", resolve_options(ConvertOptions()), back)
    assert_same_bytes(src, back)
    used = sum(os.stat(p).st_blocks * 512 for p in (tmp / "folder").rglob("*") if p.is_file())
    assert used < 600 << 20, f"the folder takes {used >> 20} MiB on disk: holes were written out"
