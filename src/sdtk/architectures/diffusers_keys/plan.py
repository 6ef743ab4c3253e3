"""Links applied to lazy tensors, both ways: nothing is read until a writer asks, renames and
reshapes keep the source's file span (so the writer copies bytes file to file), and row slices of
a fused tensor get the span of their rows."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from sdtk.architectures.diffusers_keys.links import Link
from sdtk.tensors import FileSpan, LazyTensor, numel


class LinkShapeError(ValueError):
    """A tensor's shape does not fit its link (e.g. a fused qkv whose rows do not add up)."""


def diffusers_shapes(link: Link, shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    shape = tuple(shape)
    if link.kind == "same":
        return [shape]
    if link.kind == "conv1x1":
        if len(shape) != 4 or shape[2:] != (1, 1):
            raise LinkShapeError(f"{link.single}: expected a 1x1 conv, got {list(shape)}")
        return [shape[:2]]
    if link.kind == "split":
        if not shape or sum(link.sizes) != shape[0]:
            raise LinkShapeError(f"{link.single}: {list(shape)} does not split into rows {list(link.sizes)}")
        return [(n,) + shape[1:] for n in link.sizes]
    if link.kind == "transpose":
        if len(shape) != 2:
            raise LinkShapeError(f"{link.single}: expected 2-D, got {list(shape)}")
        return [shape[::-1]]
    if not shape or shape[0] % 2:  # swap
        raise LinkShapeError(f"{link.single}: {list(shape)} has no two equal halves")
    return [shape]


def _swap_halves(arr: np.ndarray) -> np.ndarray:
    half = arr.shape[0] // 2
    return np.concatenate([arr[half:], arr[:half]])


def to_diffusers(link: Link, t: LazyTensor) -> List[LazyTensor]:
    """The diffusers tensor(s) of one single-file tensor."""
    shapes = diffusers_shapes(link, t.shape)
    if link.kind in ("same", "conv1x1"):
        shp = shapes[0]
        loader = t.loader if link.kind == "same" else (lambda: t.read().reshape(shp))
        return [LazyTensor(link.diffusers[0], t.dtype, shp, loader, t.span, t.verify)]
    if link.kind == "transpose":
        return [LazyTensor(link.diffusers[0], t.dtype, shapes[0], lambda: np.ascontiguousarray(t.read().T))]
    if link.kind == "swap":
        return [LazyTensor(link.diffusers[0], t.dtype, shapes[0], lambda: _swap_halves(t.read()))]
    out, row = [], 0
    row_bytes = numel(t.shape[1:]) * t.dtype.itemsize
    for name, shp in zip(link.diffusers, shapes):
        start, stop = row, row + shp[0]
        span = FileSpan(t.span.path, t.span.offset + start * row_bytes, (stop - start) * row_bytes) if t.span else None
        out.append(LazyTensor(name, t.dtype, shp, (lambda a=start, b=stop: t.read()[a:b]), span, t.verify))
        row = stop
    return out


def single_shape(link: Link, shapes: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
    if link.kind == "same" or link.kind == "swap":
        return tuple(shapes[0])
    if link.kind == "conv1x1":
        return tuple(shapes[0]) + (1, 1)
    if link.kind == "transpose":
        return tuple(shapes[0])[::-1]
    rest = {tuple(s[1:]) for s in shapes}
    if len(rest) != 1:
        raise LinkShapeError(f"{link.single}: parts {[list(s) for s in shapes]} cannot be joined")
    return (sum(s[0] for s in shapes),) + rest.pop()


def to_single(link: Link, parts: Sequence[LazyTensor]) -> LazyTensor:
    """The single-file tensor of one link from its diffusers tensor(s)."""
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise LinkShapeError(f"{link.single}: parts have different dtypes {sorted(d.short for d in dtypes)}")
    shp = single_shape(link, [p.shape for p in parts])
    first = parts[0]
    if link.kind == "same":
        return LazyTensor(link.single, first.dtype, shp, first.loader, first.span, first.verify)
    if link.kind == "conv1x1":
        return LazyTensor(link.single, first.dtype, shp, lambda: first.read().reshape(shp), first.span, first.verify)
    if link.kind == "transpose":
        return LazyTensor(link.single, first.dtype, shp, lambda: np.ascontiguousarray(first.read().T))
    if link.kind == "swap":
        return LazyTensor(link.single, first.dtype, shp, lambda: _swap_halves(first.read()))
    checks = [p.verify for p in parts if p.verify is not None]
    verify = (lambda: [check() for check in checks] and None) if checks else None
    return LazyTensor(link.single, first.dtype, shp, lambda: np.concatenate([p.read() for p in parts]), _joined_span(parts),
                      verify)


def _joined_span(parts: Sequence[LazyTensor]):
    """One span for the fused tensor when its parts lie back to back, in order, in one file (as
    in the folders sdtk writes: q, k, v follow each other), so the writer copies it file to file."""
    spans = [p.span for p in parts]
    if any(s is None or s.length != p.nbytes for s, p in zip(spans, parts)):
        return None
    for a, b in zip(spans, spans[1:]):
        if b.path != a.path or b.offset != a.offset + a.length:
            return None
    return FileSpan(spans[0].path, spans[0].offset, sum(s.length for s in spans))
