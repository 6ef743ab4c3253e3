"""Sample model files built from real layouts (no weights are shipped: names, shapes, dtypes).

Used by `sdtk demo`, the tests and the benchmarks:
- `write_sparse_safetensors`: a full-size file in a second (header, then the file is extended to
  its final size: sparse, zero-filled).
- `layout_plan(..., values="random", scale=...)`: tensors with small random values, optionally
  scaled down (every dimension divided, keeping names) for exact-value tests.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

from sdtk.fileio import AtomicOutput
from sdtk.formats.safetensors import build_header
from sdtk.real_layouts import LAYOUT_NAMES, Layout, load_layout  # noqa: F401 - re-exported for callers
from sdtk.tensors import LazyTensor, dtype, numel

def _scaled(shape: Tuple[int, ...], scale: Optional[int]) -> Tuple[int, ...]:
    if not scale:
        return shape
    return tuple(max(1, d // scale) if d > 8 else d for d in shape)


def layout_plan(layout: Layout, values: str = "zeros", seed: int = 0, scale: Optional[int] = None) -> List[LazyTensor]:
    """A write plan for `layout`: zeros, or small seeded random values ("random"), optionally with
    every dimension above 8 divided by `scale` (names kept; shapes no longer the real ones).
    Integer tensors named `*position_ids` get 0..n-1, as in real files."""
    plan = []
    for i, (key, shape, dt_name) in enumerate(layout.tensors):
        dt = dtype(dt_name)
        shp = _scaled(tuple(shape), scale)
        plan.append(LazyTensor(key, dt, shp, loader=_value_loader(key, dt, shp, values, seed * 100003 + i)))
    return plan


def _value_loader(key, dt, shape, values, seed):
    def load():
        import numpy as np

        if key.endswith("position_ids") and not dt.is_float:
            return np.broadcast_to(np.arange(shape[-1], dtype=dt.numpy), shape).copy() if shape else np.zeros(shape, dt.numpy)
        if values == "zeros" or numel(shape) == 0:
            return np.zeros(shape, dtype=dt.numpy)
        rng = np.random.default_rng(seed)
        if dt.is_float:
            return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dt.numpy)
        if dt.kind == "bool":
            return rng.integers(0, 2, shape).astype(dt.numpy)
        return rng.integers(0, 1000, shape).astype(dt.numpy)

    return load


def write_sparse_safetensors(path, layout: Layout, metadata: Optional[Dict[str, str]] = None, overwrite: bool = True) -> int:
    """A full-size, zero-filled safetensors file of `layout`, written in milliseconds: the header,
    then the file extended to its final size (sparse on every common file system).
    Integer position_ids are real (0..n-1), so the file is healthy, not just zeros."""
    plan = layout_plan(layout)
    header = build_header(plan, metadata)
    total = len(header) + sum(t.nbytes for t in plan)
    with AtomicOutput(path, overwrite=overwrite) as out:
        out.write(header)
        offset = len(header)
        for t in plan:
            if t.name.endswith("position_ids") and not t.dtype.is_float and t.nbytes:
                out.seek(offset)
                out.write(t.read().tobytes())
            offset += t.nbytes
        out.truncate(total)
    return total
