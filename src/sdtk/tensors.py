"""Dtypes and lazy tensors: numpy + ml_dtypes, no torch.

A `LazyTensor` knows its name, dtype and shape without reading any data; `read()` materialises
its values (for file-backed tensors, straight from an mmap of the file, one tensor at a time).

Naming a dtype needs neither numpy nor ml_dtypes: `DType.numpy` imports them the first time a
tensor's values are touched (header-only commands start without them; ml_dtypes 0.7 alone takes
over a second to import).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type, under every name the ecosystem uses for it."""

    name: str  # safetensors header name, e.g. "F16" (source: safetensors format spec)
    numpy_name: str  # the numpy (or ml_dtypes) type's name, resolved lazily by `.numpy`
    itemsize: int  # bytes per element
    torch_name: str  # torch.<name>, e.g. "float16"
    kind: str  # "float", "int", "uint", "bool"
    short: str  # what people write: "fp16", "bf16", "fp8-e4m3fn", "int64"

    @property
    def numpy(self) -> "np.dtype":
        """The little-endian numpy dtype (ml_dtypes for bf16/fp8); imports numpy on first use."""
        cached = _NUMPY.get(self.name)
        if cached is None:
            cached = _NUMPY[self.name] = _resolve_numpy(self.numpy_name, self.itemsize)
        return cached

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def __repr__(self) -> str:  # compact in reports and test output
        return f"DType({self.name})"

    def __str__(self) -> str:
        return self.short


_NUMPY: dict = {}  # DType.name -> resolved numpy dtype
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _resolve_numpy(numpy_name: str, itemsize: int) -> "np.dtype":
    import numpy as np

    if numpy_name in _ML_DTYPES:
        import ml_dtypes

        dt = np.dtype(getattr(ml_dtypes, numpy_name))
    else:
        dt = np.dtype(numpy_name)
    if dt.itemsize != itemsize:  # the table below is the single source; catch a typo at once
        raise AssertionError(f"dtype table: {numpy_name} is {dt.itemsize} bytes, not {itemsize}")
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


# The dtype table. Source: safetensors format spec (dtype names), torch/_utils.py + torch.storage
# (typed storage class names), ml_dtypes (bfloat16, float8_e4m3fn, float8_e5m2).
_TABLE = [
    # name      numpy name       bytes torch_name        kind     short
    ("F64", "float64", 8, "float64", "float", "fp64"),
    ("F32", "float32", 4, "float32", "float", "fp32"),
    ("F16", "float16", 2, "float16", "float", "fp16"),
    ("BF16", "bfloat16", 2, "bfloat16", "float", "bf16"),
    ("F8_E4M3", "float8_e4m3fn", 1, "float8_e4m3fn", "float", "fp8-e4m3fn"),
    ("F8_E5M2", "float8_e5m2", 1, "float8_e5m2", "float", "fp8-e5m2"),
    ("I64", "int64", 8, "int64", "int", "int64"),
    ("I32", "int32", 4, "int32", "int", "int32"),
    ("I16", "int16", 2, "int16", "int", "int16"),
    ("I8", "int8", 1, "int8", "int", "int8"),
    ("U64", "uint64", 8, "uint64", "uint", "uint64"),
    ("U32", "uint32", 4, "uint32", "uint", "uint32"),
    ("U16", "uint16", 2, "uint16", "uint", "uint16"),
    ("U8", "uint8", 1, "uint8", "uint", "uint8"),
    ("BOOL", "bool", 1, "bool", "bool", "bool"),
]

DTYPES: dict[str, DType] = {row[0]: DType(*row) for row in _TABLE}
_BY_TORCH = {d.torch_name: d for d in DTYPES.values()}
_BY_SHORT = {d.short: d for d in DTYPES.values()}
_SHORT_ALIASES = {
    "float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float": "fp32",
    "fp8": "fp8-e4m3fn", "fp8-e4m3": "fp8-e4m3fn", "fp8_e4m3fn": "fp8-e4m3fn", "e4m3fn": "fp8-e4m3fn",
    "fp8_e5m2": "fp8-e5m2", "e5m2": "fp8-e5m2", "float64": "fp64", "double": "fp64",
}


def dtype(name: str) -> DType:
    """Look a dtype up by safetensors name ("F16"), torch name ("float16") or short name ("fp16")."""
    if name in DTYPES:
        return DTYPES[name]
    if name in _BY_TORCH:
        return _BY_TORCH[name]
    key = _SHORT_ALIASES.get(name.lower(), name.lower())
    if key in _BY_SHORT:
        return _BY_SHORT[key]
    raise KeyError(f"unknown dtype {name!r}")


def dtype_of_numpy(arr_dtype) -> DType:
    """The DType of a numpy (or ml_dtypes) dtype, ignoring byte order."""
    import numpy as np

    nd = np.dtype(arr_dtype)
    for d in DTYPES.values():
        if d.itemsize == nd.itemsize and d.numpy.kind == nd.kind and d.numpy.name == nd.newbyteorder("<").name:
            return d
    raise KeyError(f"no sdtk dtype for numpy dtype {nd}")


def numel(shape: Tuple[int, ...]) -> int:
    return math.prod(shape)


# torch sizes and strides are int64 (c10::IntArrayRef); safetensors shapes are usize and its
# readers multiply them (and the dtype's bit width) with overflow checks in header order.
MAX_INT64 = (1 << 63) - 1


def geometry_problem(shape: Tuple[int, ...], itemsize: int) -> Optional[str]:
    """Why a shape cannot be stored and read back by torch and safetensors readers, or None.

    Every dimension must fit an int64, and so must the element count in bits even when zero
    dimensions are left out: `(0, 2**70)` or `(0, 2**62, 8)` have no elements, but a reader that
    multiplies the dimensions in another order overflows (safetensors refuses such a file)."""
    count = 1
    for d in shape:
        if type(d) is not int or d < 0 or d > MAX_INT64:
            return f"dimension {d} of shape {list(shape)} does not fit a 64-bit integer"
        if d:
            count *= d
            if count * itemsize * 8 > MAX_INT64:
                return f"shape {list(shape)} has more elements than a 64-bit byte count can hold"
    return None


def may_overlap(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> bool:
    """True when a strided view can reach the same element twice (broadcast, stride 0, or
    interleaved strides). Sufficient test: sorted by stride, each dimension of size > 1 must
    step over everything the smaller ones span."""
    dims = sorted((s, d) for d, s in zip(shape, stride) if d > 1)
    span = 1  # elements spanned by the dimensions so far
    for s, d in dims:
        if s < span:
            return True
        span = s * (d - 1) + span
    return False


@dataclass(frozen=True)
class FileSpan:
    """Where a tensor's raw little-endian, C-contiguous bytes lie in a file, when they do.

    Lets writers copy bytes file-to-file (os.copy_file_range) without touching them."""

    path: str
    offset: int
    length: int


@dataclass
class LazyTensor:
    """A tensor known by name, dtype and shape; its values are read only when asked for."""

    name: str
    dtype: DType
    shape: Tuple[int, ...]
    loader: Callable[[], "np.ndarray"] = field(repr=False)
    span: Optional[FileSpan] = field(default=None, repr=False)
    # Raises an SdtkError if the bytes behind `span` are corrupt (e.g. a zip record's CRC).
    # `read()` checks by itself; writers that copy `span` file to file call this instead.
    verify: Optional[Callable[[], None]] = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self) -> "np.ndarray":
        """The values as a numpy array of `self.dtype` and `self.shape` (may be a read-only view)."""
        arr = self.loader()
        if arr.shape != tuple(self.shape):
            arr = arr.reshape(self.shape)
        return arr


def from_array(name: str, arr: "np.ndarray") -> LazyTensor:
    """A LazyTensor over an in-memory array (for computed tensors and tests)."""
    return LazyTensor(name, dtype_of_numpy(arr.dtype), tuple(arr.shape), lambda: arr)
