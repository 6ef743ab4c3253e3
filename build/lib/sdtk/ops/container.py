"""The simplest conversion: same tensors, same bytes, another container (safetensors)."""
from __future__ import annotations

from typing import Dict, List

from sdtk.formats.catalogue import Catalogue
from sdtk.tensors import LazyTensor


def container_plan(cat: Catalogue) -> List[LazyTensor]:
    """Every tensor of `cat`, unchanged and in file order."""
    return list(cat.tensors.values())


def carried_metadata(cat: Catalogue) -> Dict[str, str]:
    """The input's safetensors metadata, kept as it is (pickles have none)."""
    return dict(cat.metadata)
