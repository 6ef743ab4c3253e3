"""Real model layouts, packaged as data (`sdtk/data/layouts/*.json.gz`: key, shape and dtype of
every tensor of a real published file; no weights). Read by the architecture tables (known key
sets) and by the sample builders in `sdtk.samples`."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from typing import Sequence, Tuple

from sdtk.tensors import dtype, numel

LAYOUT_NAMES = (
    "sd15-full-ema", "sd15-emaonly", "sd15-inpainting", "sd21-768-v", "sdxl-base", "sdxl-vpred-ztsnr",
    "flux1-dev", "flux1-schnell", "flux1-dev-aio", "sd3-medium-incl-clips", "vae-sd-kl-f8", "clip-l-hf",
)


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    tensors: Tuple[Tuple[str, Tuple[int, ...], str], ...]  # (key, shape, dtype short/torch name)

    @property
    def parameter_count(self) -> int:
        return sum(numel(s) for _, s, _ in self.tensors)

    def with_dtype(self, float_dtype: str) -> "Layout":
        """The same layout with every float tensor stored as `float_dtype` (e.g. "float16")."""
        rows = tuple((k, s, float_dtype if dtype(d).is_float else d) for k, s, d in self.tensors)
        return Layout(self.name, self.description, rows)

    def rename(self, mapping) -> "Layout":
        return Layout(self.name, self.description, tuple((mapping(k), s, d) for k, s, d in self.tensors))

    def without(self, predicate) -> "Layout":
        return Layout(self.name, self.description, tuple(r for r in self.tensors if not predicate(r[0])))

    def plus(self, rows: Sequence[Tuple[str, Sequence[int], str]]) -> "Layout":
        return Layout(self.name, self.description, self.tensors + tuple((k, tuple(s), d) for k, s, d in rows))


def load_layout(name: str) -> Layout:
    """A real model layout by name (see LAYOUT_NAMES)."""
    ref = resources.files("sdtk.data").joinpath("layouts", f"{name}.json.gz")
    with ref.open("rb") as fh:
        data = json.loads(gzip.decompress(fh.read()))
    rows = tuple((k, tuple(s), d) for k, s, d in data["tensors"])
    return Layout(data["name"], data["description"], rows)
