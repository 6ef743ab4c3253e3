"""The BLAS thread pools of numpy and SciPy (OpenBLAS), limited while sdtk computes in its own threads.

Why (measured with perf on the 2-core test machine, `lora apply` of a rank-16 LoRA into SD1.5):
the products sdtk asks for are thin (rank 4-128), so OpenBLAS's worker threads mostly spin
waiting for work (`blas_thread_server`, `exec_blas_async_wait`: 45 % of all samples, in two
OpenBLAS copies, numpy's and SciPy's); the same bake took 2.9 s of CPU with one BLAS thread
instead of 7.4 s, and sdtk then computes two tensors at a time on its own threads instead.

`limited(1)` sets every loaded OpenBLAS to `n` threads (through its exported
`*openblas_set_num_threads*`, as threadpoolctl does) and restores the previous counts at the end.
Libraries it cannot find or drive are left alone (MKL, Accelerate, a non-Linux system).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator, List, Tuple

# (setter, getter) symbol names: upstream OpenBLAS, and the scipy-openblas builds numpy and SciPy ship
_SYMBOLS = (("openblas_set_num_threads", "openblas_get_num_threads"),
            ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"))


def _loaded_openblas() -> List[str]:
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if "openblas" in os.path.basename(path).lower() and ".so" in path and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _controls() -> List[Tuple[object, object]]:
    out = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                out.append((setter, getter))
                break
    return out


def thread_counts() -> List[int]:
    """The thread count of each loaded OpenBLAS (tests)."""
    return [getter() for _, getter in _controls()]


@contextlib.contextmanager
def limited(n: int = 1, with_scipy: bool = True) -> Iterator[None]:
    """Every loaded OpenBLAS (numpy's; with `with_scipy`, SciPy's, loaded first when SciPy is
    installed, for callers that use SciPy's LAPACK: sdtk.ops.lora.lowrank) computes on at most
    `n` threads inside the block. `with_scipy=False` for callers that use numpy alone (`lora apply`):
    importing SciPy costs ~0.5 s."""
    import numpy  # noqa: F401  (its OpenBLAS is loaded with it)

    if with_scipy:
        with contextlib.suppress(ImportError):
            import scipy.linalg.blas  # noqa: F401
    saved = []
    for setter, getter in _controls():
        old = getter()
        if old > n:
            setter(n)
            saved.append((setter, old))
    try:
        yield
    finally:
        for setter, old in saved:
            setter(old)
