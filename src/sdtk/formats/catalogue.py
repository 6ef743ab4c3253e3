"""The catalogue: what a reader returns for any model file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

from sdtk.tensors import LazyTensor


@dataclass
class Catalogue:
    """A model file opened lazily: tensors known by name/dtype/shape, nothing read until asked.

    - `tensors`: in file order; nested dicts of pickled checkpoints are flattened with dotted
      names (`state_dict.model.diffusion_model...` is exposed as `model.diffusion_model...`, see
      each reader), so every reader gives the names the ecosystem uses.
    - `metadata`: safetensors `__metadata__` (str -> str); empty for pickles.
    - `extras`: non-tensor values of pickled checkpoints, dotted names -> plain Python values
      (e.g. `global_step`, `epoch`, `hyper_parameters.lr`), never objects of the file's choosing.
    - `format`: "safetensors", "torch-zip", "torch-legacy" or "pickle".
    """

    path: str
    format: str
    tensors: Dict[str, LazyTensor]
    metadata: Dict[str, str] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)
    file_size: int = 0
    notes: List[str] = field(default_factory=list)  # non-fatal observations by the reader
    # name -> the quantized format it was read from (sdtk.quant.views.dequantize_catalogue)
    dequantized: Dict[str, str] = field(default_factory=dict)
    _closers: List[Callable[[], None]] = field(default_factory=list, repr=False)

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in closers:
            try:
                close()
            except BufferError:
                pass  # an array still views the mmap; it is released when that array goes

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors.values())

    def __getitem__(self, name: str) -> LazyTensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
