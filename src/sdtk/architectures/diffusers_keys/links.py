"""Links between single-file (LDM/SAI/BFL) tensors and diffusers tensors: the one table both
directions of the conversion are read from.

A `Link` ties one single-file tensor to one or more diffusers tensors by a rule whose inverse is
exact (shared reference diffusers-interop.md section 4, "Round-trip guarantees"):
- `same`: renamed only;
- `conv1x1`: the single file holds a 1x1 conv [o, i, 1, 1], diffusers a linear [o, i] (VAE
  mid-block attention; SD2-era proj_in/out saved the other way);
- `split`: the single file holds the concatenation along dim 0 of the diffusers parts, in order,
  with the given row counts (qkv fusions: OpenCLIP in_proj, SD3 qkv, FLUX qkv and linear1);
- `transpose`: a 2-D transpose (OpenCLIP text_projection, applied as x @ P);
- `swap`: the two halves along dim 0 exchanged (shift/scale vs scale/shift modulations).
Keys are relative to the component (prefixes are the pipeline table's business).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

KINDS = ("same", "conv1x1", "split", "transpose", "swap")


@dataclass(frozen=True)
class Link:
    single: str  # key in the single file (component prefix removed)
    diffusers: Tuple[str, ...]  # key(s) in the diffusers component file
    kind: str = "same"
    sizes: Tuple[int, ...] = ()  # split: rows of each part (dim 0), in order

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert (len(self.diffusers) > 1) == (self.kind == "split"), self


def same(single: str, diffusers: str) -> Link:
    return Link(single, (diffusers,))


def weight_and_bias(single: str, diffusers: str, bias: bool = True) -> List[Link]:
    """`X.weight` (and `X.bias`) renamed to `Y.weight` (and `Y.bias`)."""
    out = [same(single + ".weight", diffusers + ".weight")]
    if bias:
        out.append(same(single + ".bias", diffusers + ".bias"))
    return out


def split(single: str, parts: Iterable[str], sizes: Iterable[int]) -> Link:
    return Link(single, tuple(parts), "split", tuple(sizes))


def check_unique(links: Iterable[Link]) -> Dict[str, Link]:
    """{single key: link}; a key on either side appearing twice is a table bug (AssertionError)."""
    by_single: Dict[str, Link] = {}
    seen = set()
    for link in links:
        assert link.single not in by_single, f"single-file key twice: {link.single}"
        by_single[link.single] = link
        for d in link.diffusers:
            assert d not in seen, f"diffusers key twice: {d}"
            seen.add(d)
    return by_single
