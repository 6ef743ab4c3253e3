"""Fast float32 <-> float16 casts with numpy's exact results.

numpy converts float32 to float16 in a scalar software loop (about 0.6 GB/s per core on x86-64),
which made every fp16 conversion CPU-bound. The optional C extension `sdtk._fastcast` uses the
CPU's F16C instructions (8 values per instruction, IEEE round to nearest even), then rewrites NaN
lanes so that every output bit equals numpy's. bfloat16 and fp8 casts stay with ml_dtypes, which
is already vectorised. Without the extension (no C compiler at install time, a CPU without F16C)
or with SDTK_FASTCAST=off in the environment, the same functions fall back to numpy.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

try:  # built by setup.py when a C compiler is present; optional by design
    from sdtk import _fastcast as _ext
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _ext = None

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")


def _enabled() -> bool:
    return _ext is not None and os.environ.get("SDTK_FASTCAST", "").lower() not in ("off", "0", "no")


def status() -> str:
    """One line for `--version`-style reports: which cast path is active."""
    if _ext is None:
        return "numpy (the C extension is not built)"
    if not _enabled():
        return "numpy (SDTK_FASTCAST=off)"
    return "F16C" if _ext.has_f16c() else "numpy (this CPU has no F16C)"


def _kernel(src: np.dtype, dst: np.dtype):
    """The C function for this pair, or None (numpy path)."""
    if not _enabled():
        return None
    if src == _F32 and dst == _F16:
        return _ext.f32_to_f16 if _ext.has_f16c() else None
    if src == _F16 and dst == _F32:
        return _ext.f16_to_f32 if _ext.has_f16c() else None
    return None


def cast_into(src: np.ndarray, out: np.ndarray) -> Optional[int]:
    """Cast `src` into the same-sized `out` when a fast kernel exists for the pair; returns how
    many finite values became inf (0 for widening casts), or None when there is no fast kernel
    (the caller casts with numpy). Both arrays must be C-contiguous with native byte order."""
    kernel = _kernel(src.dtype, out.dtype)
    if kernel is None or src.size != out.size or not (src.flags.c_contiguous and out.flags.c_contiguous):
        return None
    if src.size == 0:
        return 0
    # Raw bytes: numpy float16 has no buffer-protocol format character everywhere.
    return kernel(src.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8))


def astype(arr: np.ndarray, dtype) -> np.ndarray:
    """`arr.astype(dtype)` with the same bits, faster for fp32<->fp16."""
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return arr.copy()
    if _kernel(arr.dtype, dtype) is not None:
        src = np.ascontiguousarray(arr)
        out = np.empty(arr.shape, dtype=dtype)
        if cast_into(src, out) is not None:
            return out
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(dtype)


def assign(out: np.ndarray, src: np.ndarray) -> None:
    """`out[...] = src` (a cast when the dtypes differ), through the fast kernel when one exists."""
    if out.dtype != src.dtype and out.shape == src.shape and cast_into(src, out) is not None:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        out[...] = src
