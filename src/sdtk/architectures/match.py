"""The tiny condition language the signature tables are written in (pure: names and shapes only).

A condition is a tuple; a row matches when all its conditions hold over `shapes`, a dict
{key: shape} of the keys under one prefix (prefix already removed):

    ("has", key)                         key present
    ("lacks", key)                       key absent
    ("dim", key, axis, value)            shape[axis] == value (value may be a tuple: any of)
    ("ndim", key, n)                     len(shape) == n
    ("dim_div", key, axis, d, value)     shape[axis] // d == value
    ("depth", prefix, n)                 number of distinct integer children under prefix == n
                                         (e.g. "middle_block.1.transformer_blocks." -> 10)
    ("any_prefix", prefix)               some key starts with prefix
    ("feature", name, value)             a per-family feature (e.g. in_channels) == value
    ("any_suffix", suffix)               some key ends with suffix
    ("any", (cond, cond, ...))           at least one of the conditions holds
    ("sole", widths)                     exactly one tensor, 1-D or 2-D, last dim in widths
                                         (diffusers textual-inversion files: {token: [768]})
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

Shape = Tuple[int, ...]
Condition = tuple


def _dim(shape: Optional[Shape], axis: int) -> Optional[int]:
    if shape is None or axis >= len(shape) or axis < -len(shape):
        return None
    return shape[axis]


def _equals(actual, expected) -> bool:
    if actual is None:
        return False
    if isinstance(expected, tuple):
        return actual in expected
    return actual == expected


def child_indices(keys: Iterable[str], prefix: str) -> set:
    """The distinct integer path segments right after `prefix` (e.g. block numbers)."""
    found = set()
    n = len(prefix)
    for key in keys:
        if key.startswith(prefix):
            head = key[n:].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def holds(cond: Condition, shapes: Mapping[str, Shape], features: Optional[Dict[str, object]] = None) -> bool:
    op = cond[0]
    if op == "has":
        return cond[1] in shapes
    if op == "lacks":
        return cond[1] not in shapes
    if op == "dim":
        return _equals(_dim(shapes.get(cond[1]), cond[2]), cond[3])
    if op == "ndim":
        shape = shapes.get(cond[1])
        return shape is not None and len(shape) == cond[2]
    if op == "dim_div":
        d = _dim(shapes.get(cond[1]), cond[2])
        return d is not None and _equals(d // cond[3], cond[4])
    if op == "depth":
        return _equals(len(child_indices(shapes, cond[1])), cond[2])
    if op == "any_prefix":
        return any(k.startswith(cond[1]) for k in shapes)
    if op == "any_suffix":
        return any(k.endswith(cond[1]) for k in shapes)
    if op == "any":
        return any(holds(c, shapes, features) for c in cond[1])
    if op == "sole":
        if len(shapes) != 1:
            return False
        shape = next(iter(shapes.values()))
        return shape is not None and len(shape) in (1, 2) and _equals(shape[-1], cond[1])
    if op == "feature":
        return features is not None and _equals(features.get(cond[1]), cond[2])
    raise ValueError(f"unknown condition {cond!r}")


def all_hold(conds: Sequence[Condition], shapes: Mapping[str, Shape], features=None) -> bool:
    return all(holds(c, shapes, features) for c in conds)
