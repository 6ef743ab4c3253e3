"""Change the precision of floating-point tensors, counting values that do not fit.

Casts round to nearest, ties to even: numpy for fp16 (or `sdtk.fastcast`'s F16C path, which gives
numpy's bits), ml_dtypes for bf16/fp8; the same results as torch's `.to()`. A finite value too
large for the target becomes inf (fp16, bf16, e5m2) or NaN (e5m2) or is clipped to +-448 (e4m3fn
has no inf; torch saturates): we count those per tensor, so `convert` can refuse a lossy fp16
cast and suggest bf16. Integer and bool tensors, position ids and marker tensors are never cast.
Large tensors are cast in chunks into one output array: memory is the output tensor plus a chunk.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from sdtk import fastcast
from sdtk.ops.components import MARKERS
from sdtk.tensors import DType, LazyTensor

CHUNK_ELEMENTS = 1 << 20  # 1 Mi values: 4 MB of fp32 per step (cache-friendly, split among threads)
# Targets without inf whose out-of-range values are clipped to +-max, as torch does
# (torch 2.x `.to(torch.float8_e4m3fn)` saturates; ml_dtypes would give NaN).
SATURATING = frozenset({"F8_E4M3"})
# The largest finite value of each float dtype (safetensors names), so that deciding whether a cast
# can overflow needs no ml_dtypes import (about 1.5 s with ml_dtypes 0.7; an fp32 -> fp16 convert
# never needs it otherwise). Sources: IEEE 754 binary16/32/64, Google bfloat16, OCP FP8 (E4M3:
# 448, no inf; E5M2: 57344); equal to ml_dtypes.finfo(...).max (tests/test_cast.py checks).
FINITE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38,
              "F64": 1.7976931348623157e308, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}


def finite_max(dt: DType) -> float:
    """The largest finite value of a float dtype (the table; ml_dtypes for any other)."""
    if dt.name in FINITE_MAX:
        return FINITE_MAX[dt.name]
    import ml_dtypes

    return float(ml_dtypes.finfo(dt.numpy).max)


def never_cast(t: LazyTensor) -> bool:
    """Tensors whose dtype carries meaning: integers, bools, position ids, markers."""
    return not t.dtype.is_float or t.name.endswith("position_ids") or t.name in MARKERS


def _may_overflow(src: DType, dst: DType) -> bool:
    """True when a finite `src` value can become non-finite in `dst` (narrower range)."""
    if not (src.is_float and dst.is_float) or src == dst:
        return False
    return finite_max(dst) < finite_max(src)


def cast_array(arr: np.ndarray, dst: DType) -> tuple[np.ndarray, int]:
    """`arr` cast to `dst` (round to nearest even) and how many finite values did not fit
    (became inf, or were clipped for saturating targets). Large arrays are cast in chunks by a
    small thread pool (numpy releases the GIL while casting)."""
    out = np.empty(arr.shape, dtype=dst.numpy)
    if arr.size == 0:
        return out, 0
    check = _may_overflow(_dt(arr.dtype), dst)
    limit = finite_max(dst) if dst.name in SATURATING else None
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    starts = range(0, flat_in.size, CHUNK_ELEMENTS)

    def one(start: int) -> int:
        stop = min(start + CHUNK_ELEMENTS, flat_in.size)
        return _cast_chunk(flat_in[start:stop], flat_out[start:stop], dst, check, limit)

    if len(starts) > 1:
        overflow = sum(_pool().map(one, starts))
    else:
        overflow = one(0)
    return out, overflow


def cast_f16_counting_nonfinite(arr: np.ndarray) -> Optional[tuple[np.ndarray, int, int]]:
    """float32 `arr` cast to float16 as `cast_array` casts it, with (overflowed values, NaN/inf
    values of `arr`) counted in the same pass (no separate finiteness scan of the float32 array);
    None without the F16C kernel."""
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        return None
    out = np.empty(arr.shape, dtype=np.float16)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    starts = range(0, flat_in.size, CHUNK_ELEMENTS)

    def one(start: int):
        stop = min(start + CHUNK_ELEMENTS, flat_in.size)
        return fastcast.f32_to_f16_counting(flat_in[start:stop], flat_out[start:stop])

    counts = list(_pool().map(one, starts)) if len(starts) > 1 else [one(0)] if flat_in.size else [(0, 0)]
    if any(c is None for c in counts):
        return None
    return out, sum(c[0] for c in counts), sum(c[1] for c in counts)


def _cast_chunk(piece: np.ndarray, target: np.ndarray, dst: DType, check: bool, limit) -> int:
    if limit is not None:
        fast = fastcast.cast_into(piece, target, saturate=True)  # same bits and count as below
        if fast is not None:
            return fast if check else 0
        n = 0
        if check:
            n = int(np.count_nonzero(np.abs(piece) > limit) - np.count_nonzero(np.isinf(piece)))
        target[...] = np.clip(piece, -limit, limit).astype(dst.numpy)
        return n
    fast = fastcast.cast_into(piece, target)  # C path: same bits as numpy / ml_dtypes, counts overflow itself
    if fast is not None:
        return fast if check else 0
    with np.errstate(over="ignore", invalid="ignore"):
        target[...] = piece.astype(dst.numpy)
    if not check or not _any_non_finite(target, dst):
        return 0
    return int(np.count_nonzero(~np.isfinite(target) & np.isfinite(piece)))


# Bits of the exponent field per target (all ones = inf or NaN): a cheap integer test on the
# output tells whether a chunk needs the exact count. Source: IEEE 754 binary16, bfloat16, OCP FP8.
_EXPONENT_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C),
                  "F32": (np.uint32, 0x7F800000)}


def _any_non_finite(target: np.ndarray, dst: DType) -> bool:
    row = _EXPONENT_BITS.get(dst.name)
    if row is None:
        return not bool(np.isfinite(target).all())
    uint, exp = row
    return bool((target.view(uint) & uint(exp)).max() == exp)


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="sdtk-cast")
    return _POOL


def _dt(np_dtype) -> DType:
    from sdtk.tensors import dtype_of_numpy

    return dtype_of_numpy(np_dtype)


@dataclass
class OverflowCount:
    """Values that became inf/NaN in the cast, per tensor (filled in while writing)."""

    by_tensor: Dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self.by_tensor[name] = self.by_tensor.get(name, 0) + n

    @property
    def total(self) -> int:
        return sum(self.by_tensor.values())


def cast_plan(
    plan: Sequence[LazyTensor],
    target_for: Callable[[LazyTensor], Optional[DType]],
    overflow: Optional[OverflowCount] = None,
) -> tuple[List[LazyTensor], int]:
    """Each float tensor cast to `target_for(t)` (None: unchanged). Returns (plan, tensors cast).
    Casting happens when the writer reads each tensor; overflows are added to `overflow`."""
    out: List[LazyTensor] = []
    changed = 0
    for t in plan:
        dst = None if never_cast(t) else target_for(t)
        if dst is None or dst == t.dtype:
            out.append(t)
            continue
        out.append(LazyTensor(t.name, dst, tuple(t.shape), _cast_loader(t, dst, overflow)))
        changed += 1
    return out, changed


def _cast_loader(t: LazyTensor, dst: DType, overflow: Optional[OverflowCount]):
    def load() -> np.ndarray:
        arr, n = cast_array(t.read(), dst)
        if overflow is not None:
            overflow.add(t.name, n)
        return arr

    return load
