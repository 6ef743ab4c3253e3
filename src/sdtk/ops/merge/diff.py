"""`sdtk diff A B`: how different two models of the same architecture are, per block and per
component (cosine similarity and the relative L2 norm of the difference), streamed chunk by
chunk in float64: memory of a few chunks, whatever the model size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from sdtk.ops.merge.arch import check_compatible, component_of, describe
from sdtk.ops.merge.blocks import BLOCK_LISTS, block_of
from sdtk.tensors import numel

CHUNK = 1 << 22


@dataclass
class Accumulator:
    """Sums for cosine(A, B) = <A,B> / (|A| |B|) and relative L2 = |A - B| / |A|."""

    keys: int = 0
    params: int = 0
    dot: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    dd: float = 0.0
    identical: int = 0

    def add(self, dot: float, aa: float, bb: float, dd: float) -> None:
        self.dot += dot
        self.aa += aa
        self.bb += bb
        self.dd += dd

    def as_dict(self) -> dict:
        na, nb = self.aa ** 0.5, self.bb ** 0.5
        if na == 0 or nb == 0:
            cos = 1.0 if na == nb else 0.0
        else:
            cos = self.dot / (na * nb)
        rel = (self.dd ** 0.5) / na if na else (0.0 if self.dd == 0 else float("inf"))
        return {"keys": self.keys, "parameters": self.params, "identical_keys": self.identical,
                "cosine": round(cos, 8), "relative_l2": round(rel, 8)}


def _sums(a: np.ndarray, b: np.ndarray):
    """<A,B>, |A|^2, |B|^2, |A-B|^2 of one chunk (float64), and whether A == B."""
    d = a - b
    return (float(a @ b), float(a @ a), float(b @ b), float(d @ d)), not d.any()


@dataclass
class DiffResult:
    family: Optional[str]
    blocks: Dict[str, dict]
    components: Dict[str, dict]
    total: dict
    only_in_a: List[str] = field(default_factory=list)
    only_in_b: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)
    non_float_differs: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"family": self.family, "total": self.total, "components": self.components, "blocks": self.blocks,
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "shape_mismatch": self.shape_mismatch,
                "non_float_differs": self.non_float_differs}


def diff_models(cat_a, cat_b, on_tensor: Optional[Callable[[int], None]] = None) -> DiffResult:
    from sdtk.quant.views import align_names, dequantize_catalogue

    dequantize_catalogue(cat_a), dequantize_catalogue(cat_b)  # quantized inputs compare by their values
    align_names(cat_b, cat_a.tensors)  # a GGUF file against a checkpoint: by A's names
    (fam_a, title_a), (fam_b, title_b) = describe(cat_a), describe(cat_b)
    shapes_a = {k: tuple(t.shape) for k, t in cat_a.tensors.items()}
    shapes_b = {k: tuple(t.shape) for k, t in cat_b.tensors.items()}
    check_compatible([cat_a.path, cat_b.path], [fam_a, fam_b], [shapes_a, shapes_b], [title_a, title_b])
    names = BLOCK_LISTS.get(fam_a)
    blocks: Dict[str, Accumulator] = {n: Accumulator() for n in names} if names else {}
    comps: Dict[str, Accumulator] = {}
    total = Accumulator()
    result = DiffResult(fam_a, {}, {}, {})
    for key, ta in cat_a.tensors.items():
        tb = cat_b.tensors.get(key)
        if tb is None:
            result.only_in_a.append(key)
            continue
        if tuple(ta.shape) != tuple(tb.shape):
            result.shape_mismatch.append(key)
            continue
        if not (ta.dtype.is_float and tb.dtype.is_float):
            if ta.dtype != tb.dtype or not np.array_equal(ta.read(), tb.read()):  # e.g. float-corrupted position_ids
                result.non_float_differs.append(key)
            continue
        groups = [total, comps.setdefault(component_of(key), Accumulator())]
        if names:
            groups.append(blocks[block_of(key, fam_a)])
        n = numel(ta.shape)
        fa, fb = ta.read().reshape(-1), tb.read().reshape(-1)
        same = True
        for lo in range(0, n, CHUNK):
            sums, equal = _sums(fa[lo:lo + CHUNK].astype(np.float64), fb[lo:lo + CHUNK].astype(np.float64))
            same = same and equal
            for g in groups:
                g.add(*sums)
        for g in groups:
            g.keys += 1
            g.params += n
            g.identical += same
        if on_tensor is not None:
            on_tensor(ta.nbytes)
    result.only_in_b = [k for k in cat_b.tensors if k not in cat_a.tensors]
    result.blocks = {n: acc.as_dict() for n, acc in blocks.items() if acc.keys}
    result.components = {n: acc.as_dict() for n, acc in sorted(comps.items())}
    result.total = total.as_dict()
    return result
