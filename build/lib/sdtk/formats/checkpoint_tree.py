"""Flatten the object tree of a pickled checkpoint into dotted tensor names and plain extras.

- A PyTorch Lightning checkpoint's `state_dict` is exposed under its own names
  (`model.diffusion_model...`), as every SD tool does (A1111 `get_state_dict_from_checkpoint`,
  ComfyUI `load_torch_file`); everything else keeps its place as a dotted name
  (`string_to_param.*`, `optimizer_states.0.state.0.exp_avg`).
- `ParameterDict` modules (textual-inversion embeddings) expose their parameters.
- Non-tensor values go to `extras` as plain Python values (`global_step`, `epoch`, ...).
Work is bounded (depth, nodes visited) so shared-reference and self-reference bombs fail cleanly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from sdtk.errors import FormatError
from sdtk.formats.picklevm import (Callee, ClassToken, ModuleState, NumpyArray, NumpyDType, StorageRef,
                                   StorageType, TensorRef, TorchDType)

MAX_DEPTH = 64
LIGHTNING_STATE_KEY = "state_dict"  # pytorch_lightning/trainer/connectors/checkpoint_connector.py


class _Walker:
    def __init__(self, path: str, budget: int):
        self.path = path
        self.budget = budget
        self.tensors: List[Tuple[str, TensorRef]] = []
        self.names: Dict[str, int] = {}
        self.extras: Dict[str, Any] = {}
        self.active: set = set()

    def tick(self, depth: int) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise FormatError(self.path, "the checkpoint's object tree is far larger than the file (reference bomb)")
        if depth > MAX_DEPTH:
            raise FormatError(self.path, f"the checkpoint's objects are nested deeper than {MAX_DEPTH} levels")

    def add_tensor(self, name: str, t: TensorRef) -> None:
        if name in self.names or name in self.extras:
            raise FormatError(self.path, f"two values flatten to the same name {name!r}")
        self.names[name] = 1
        self.tensors.append((name, t))

    def add_extra(self, name: str, value: Any) -> None:
        if name in self.names:
            raise FormatError(self.path, f"two values flatten to the same name {name!r}")
        self.extras[name] = value

    def walk(self, value: Any, prefix: str, depth: int) -> None:
        self.tick(depth)
        if isinstance(value, TensorRef):
            self.add_tensor(prefix or "tensor", value)
            return
        mapping = _as_mapping(value)
        if mapping is not None or (isinstance(value, (list, tuple)) and self.holds_tensor(value, depth)):
            if id(value) in self.active:
                raise FormatError(self.path, "the checkpoint contains a structure that contains itself")
            self.active.add(id(value))
            items = mapping.items() if mapping is not None else enumerate(value)
            empty = True
            for key, item in items:
                empty = False
                self.walk(item, f"{prefix}.{_key_text(key)}" if prefix else _key_text(key), depth + 1)
            if empty and prefix:
                self.add_extra(prefix, {} if mapping is not None else [])
            self.active.discard(id(value))
            return
        self.add_extra(prefix or "value", self.plain(value, depth))

    def holds_tensor(self, value: Any, depth: int) -> bool:
        self.tick(depth)
        if isinstance(value, TensorRef):
            return True
        if isinstance(value, (list, tuple)):
            if id(value) in self.active:
                raise FormatError(self.path, "the checkpoint contains a structure that contains itself")
            self.active.add(id(value))
            try:
                return any(self.holds_tensor(v, depth + 1) for v in value)
            finally:
                self.active.discard(id(value))
        mapping = _as_mapping(value)
        return mapping is not None and any(self.holds_tensor(v, depth + 1) for v in mapping.values())

    def plain(self, value: Any, depth: int) -> Any:
        """A plain Python value (numbers, strings, bytes, lists, dicts) for `extras`."""
        self.tick(depth)
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return value
        if isinstance(value, bytearray):
            return bytes(value)
        if isinstance(value, NumpyArray):
            return value.value
        if isinstance(value, (ClassToken, Callee)):
            return str(value)
        if isinstance(value, (StorageType, TorchDType)):
            return f"torch.{value.torch_name}"
        if isinstance(value, NumpyDType):
            return str(value.numpy())
        if isinstance(value, StorageRef):
            return f"<storage {value.key}>"
        if id(value) in self.active:
            raise FormatError(self.path, "the checkpoint contains a structure that contains itself")
        self.active.add(id(value))
        try:
            mapping = _as_mapping(value)
            if mapping is not None:
                return {_key_text(k): self.plain(v, depth + 1) for k, v in mapping.items()}
            if isinstance(value, (list, tuple)):
                return [self.plain(v, depth + 1) for v in value]
            if isinstance(value, (set, frozenset)):
                return sorted((self.plain(v, depth + 1) for v in value), key=repr)
        finally:
            self.active.discard(id(value))
        return repr(value)


def _as_mapping(value: Any):
    if isinstance(value, dict):
        return value
    if isinstance(value, ModuleState):  # ParameterDict: its parameters (and buffers, if any)
        merged = {}
        for part in ("_parameters", "_buffers"):
            inner = value.state.get(part)
            if isinstance(inner, dict):
                merged.update(inner)
        return merged
    return None


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (ClassToken, Callee)):
        return str(key)
    return str(key)


def flatten_checkpoint(root: Any, path: str, budget: int) -> Tuple[List[Tuple[str, TensorRef]], Dict[str, Any]]:
    """(tensors in pickle order as (dotted name, TensorRef), extras) of an unpickled checkpoint."""
    walker = _Walker(path, budget)
    if isinstance(root, dict) and isinstance(root.get(LIGHTNING_STATE_KEY), dict):
        for key, value in root.items():
            if key == LIGHTNING_STATE_KEY:
                walker.active.add(id(value))
                for k, v in value.items():
                    walker.walk(v, _key_text(k), 1)
                walker.active.discard(id(value))
            else:
                walker.walk(value, _key_text(key), 1)
    else:
        walker.walk(root, "", 0)
    return walker.tensors, walker.extras
