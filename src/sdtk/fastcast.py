"""Fast casts between float32, float16, bfloat16 and fp8, with numpy's / ml_dtypes' exact bits.

numpy converts float32 to float16 in a scalar software loop (about 0.6 GB/s per core on x86-64),
which made every fp16 conversion CPU-bound. The optional C extension `sdtk._fastcast` uses the
CPU's F16C instructions (8 values per instruction, IEEE round to nearest even), then rewrites NaN
lanes so that every output bit equals numpy's. float32 -> fp8 (e4m3fn, e5m2) and bfloat16 ->
float32 are branch-free C loops the compiler vectorises (ml_dtypes does them one value at a time,
about 0.06 G values/s here); float32 -> bfloat16 stays with ml_dtypes, which is fast. Without the
extension (no C compiler at install time) or with SDTK_FASTCAST=off in the environment, the same
functions fall back to numpy and ml_dtypes.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

try:  # built by setup.py when a C compiler is present; optional by design (needs no numpy)
    import sdtk._fastcast as _ext
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _ext = None

_F32 = _F16 = _BF16 = _UNLOADED = None
_FP8_KIND: dict = {}


def _init() -> None:
    """Import numpy on the first cast (`status()` and `--version` need none). ml_dtypes (over a
    second to import in 0.7) is not imported here: a bf16/fp8 array or dtype exists only once it
    is, so its types are looked up as soon as it has been (an fp16 merge never needs it)."""
    global np, _F32, _F16, _BF16, _FP8_KIND, _UNLOADED
    if _F32 is None:
        import numpy

        np = numpy
        _F16 = np.dtype("<f2")
        _BF16 = _UNLOADED = np.dtype("V2")  # matches no array's dtype until ml_dtypes is loaded
        _F32 = np.dtype("<f4")
    ml_dtypes = sys.modules.get("ml_dtypes") if _BF16 is _UNLOADED else None
    # another thread may be importing it right now (a partly initialised module in sys.modules):
    # then no bf16/fp8 array exists yet either, and the types are looked up on a later cast
    if ml_dtypes is not None and all(hasattr(ml_dtypes, n) for n in ("float8_e4m3fn", "float8_e5m2", "bfloat16")):
        _FP8_KIND = {np.dtype(ml_dtypes.float8_e4m3fn): 0, np.dtype(ml_dtypes.float8_e5m2): 1}
        _BF16 = np.dtype(ml_dtypes.bfloat16)


def _enabled() -> bool:
    return _ext is not None and os.environ.get("SDTK_FASTCAST", "").lower() not in ("off", "0", "no")


def status() -> str:
    """One line for `--version`-style reports: which cast path is active."""
    if _ext is None:
        return "numpy (the C extension is not built)"
    if not _enabled():
        return "numpy (SDTK_FASTCAST=off)"
    return "F16C" if _ext.has_f16c() else "C for fp8/bf16, numpy for fp16 (this CPU has no F16C)"


def _raw(a: np.ndarray) -> np.ndarray:
    # Raw bytes for the buffer protocol: numpy float16 and the ml_dtypes types have no format
    # character every consumer accepts.
    return a.reshape(-1).view(np.uint8)


def _direct(src: np.dtype, dst: np.dtype, saturate: bool):
    """The C function (src, dst) -> overflow count for this pair, or None."""
    _init()
    if src == _F32 and dst == _F16:
        return _ext.f32_to_f16 if _ext.has_f16c() else None
    if src == _F16 and dst == _F32:
        return _ext.f16_to_f32 if _ext.has_f16c() else None
    if src == _BF16 and dst == _F32:
        return _ext.bf16_to_f32
    if src == _F32 and dst in _FP8_KIND:
        kind = _FP8_KIND[dst]
        return lambda a, b: _ext.f32_to_fp8(a, b, kind, saturate)
    if src in (_F16, _BF16) and dst in _FP8_KIND and (src == _BF16 or _ext.has_f16c()):
        kind, is_bf16 = _FP8_KIND[dst], src == _BF16
        return lambda a, b: _ext.half_to_fp8(a, b, is_bf16, kind, saturate)
    return None


def _kernel(src: np.dtype, dst: np.dtype, saturate: bool = False):
    """A function (src array, dst array) -> overflow count for this pair, or None (numpy path).
    16-bit sources going to another narrow type are widened to float32 first (exact), then cast:
    the same result as a direct round-to-nearest-even cast."""
    _init()
    if not _enabled() or src == dst:
        return None
    direct = _direct(src, dst, saturate)
    if direct is not None:
        return lambda a, b: direct(_raw(a), _raw(b))
    if src in (_F16, _BF16) and dst in (_F16, _BF16, *_FP8_KIND):
        widen = _direct(src, _F32, False)
        narrow = _direct(_F32, dst, saturate)  # None for -> bfloat16: ml_dtypes, fast from float32
        if widen is None or (narrow is None and dst != _BF16):
            return None

        def two_step(a: np.ndarray, b: np.ndarray) -> int:
            wide = np.empty(a.shape, _F32)
            widen(_raw(a), _raw(wide))
            if narrow is None:
                b[...] = wide.astype(_BF16)
                n = 0
            else:
                n = narrow(_raw(wide), _raw(b))
            nan = np.isnan(wide)
            if nan.any():  # NaN payloads: the direct cast's own bits (ml_dtypes makes them canonical)
                b[nan] = a[nan].astype(dst)
            return n

        return two_step
    return None


def cast_into(src: np.ndarray, out: np.ndarray, saturate: bool = False) -> Optional[int]:
    """Cast `src` into the same-sized `out` when a fast kernel exists for the pair; returns how
    many finite values did not fit (became inf/NaN, or with `saturate` were clipped to the
    largest finite value: fp8 e4m3fn as torch casts), or None when there is no fast kernel (the
    caller casts with numpy / ml_dtypes). Both arrays must be C-contiguous, native byte order."""
    _init()
    kernel = _kernel(src.dtype, out.dtype, saturate)
    if kernel is None or src.size != out.size or not (src.flags.c_contiguous and out.flags.c_contiguous):
        return None
    if src.size == 0:
        return 0
    return int(kernel(src, out))


def f32_to_f16_counting(src: np.ndarray, out: np.ndarray) -> Optional[Tuple[int, int]]:
    """float32 `src` cast into float16 `out` (the same bits as `cast_into`) and, counted in the
    same pass, (finite values that became inf, NaN/inf values of `src`); None without the F16C
    kernel (the caller checks and casts another way)."""
    _init()
    if (not _enabled() or not _ext.has_f16c() or not hasattr(_ext, "f32_to_f16_counting") or src.dtype != _F32
            or out.dtype != _F16 or src.size != out.size or not (src.flags.c_contiguous and out.flags.c_contiguous)):
        return None
    if src.size == 0:
        return 0, 0
    overflow, nonfinite = _ext.f32_to_f16_counting(_raw(src), _raw(out))
    return int(overflow), int(nonfinite)


def f16_add_product(base: np.ndarray, p1: np.ndarray, p2: Optional[np.ndarray], factor, out: np.ndarray) -> Optional[Tuple[int, int]]:
    """fp16 `out` = fp16(f32(base) + (p1 * p2) * factor), or without `p2` fp16(f32(base) + p1 * factor),
    in float32 in that order (a LoHa or LoRA module baked into an fp16 weight: the same bits as
    numpy's steps and the cast), with (finite values that became inf, NaN/inf results) counted in
    the same pass; None without the F16C kernel."""
    _init()
    arrays = (base, p1, out) if p2 is None else (base, p1, p2, out)
    if (not _enabled() or not _ext.has_f16c() or not hasattr(_ext, "f16_add_scaled") or base.dtype != _F16
            or out.dtype != _F16 or p1.dtype != _F32 or (p2 is not None and p2.dtype != _F32)
            or any(a.size != base.size for a in arrays) or not all(a.flags.c_contiguous for a in arrays)):
        return None
    if base.size == 0:
        return 0, 0
    if p2 is None:
        overflow, nonfinite = _ext.f16_add_scaled(_raw(base), _raw(p1), float(factor), _raw(out))
    else:
        overflow, nonfinite = _ext.f16_add_hadamard(_raw(base), _raw(p1), _raw(p2), float(factor), _raw(out))
    return int(overflow), int(nonfinite)


def astype(arr: np.ndarray, dtype) -> np.ndarray:
    """`arr.astype(dtype)` with the same bits (non-saturating, as numpy / ml_dtypes), faster where a
    kernel exists."""
    _init()
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
    _init()
    if out.dtype != src.dtype and out.shape == src.shape and cast_into(src, out) is not None:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        out[...] = src


def weighted_sum_f16(a: "np.ndarray", b: "np.ndarray", out: "np.ndarray", wa: float, wb: float) -> Optional[int]:
    """`out[...] = fp16(wa * fp32(a) + wb * fp32(b))` for fp16 arrays, fused in one pass (a merge's
    weighted sum: the same bits as widening, `np.multiply`, `np.add` in float32 and the cast, for
    every non-NaN result). Returns the finite values that overflowed, or None when the C kernel is
    not available for these arrays (the caller computes the unfused way)."""
    _init()
    if not _enabled() or not _ext.has_f16c() or not hasattr(_ext, "f16_weighted_sum"):
        return None
    if not (a.dtype == b.dtype == out.dtype == _F16) or not (a.size == b.size == out.size):
        return None
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        return None
    if a.size == 0:
        return 0
    return int(_ext.f16_weighted_sum(_raw(a), _raw(b), _raw(out), float(wa), float(wb)))
