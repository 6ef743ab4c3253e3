"""Dtypes and lazy tensors: numpy + ml_dtypes, no torch.

A `LazyTensor` knows its name, dtype and shape without reading any data; `read()` materialises
its values (for file-backed tensors, straight from an mmap of the file, one tensor at a time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type, under every name the ecosystem uses for it."""

    name: str  # safetensors header name, e.g. "F16" (source: safetensors format spec)
    numpy: np.dtype  # little-endian numpy dtype (ml_dtypes for bf16/fp8)
    torch_name: str  # torch.<name>, e.g. "float16"
    kind: str  # "float", "int", "uint", "bool"
    short: str  # what people write: "fp16", "bf16", "fp8-e4m3fn", "int64"

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def __repr__(self) -> str:  # compact in reports and test output
        return f"DType({self.name})"

    def __str__(self) -> str:
        return self.short


def _le(dt) -> np.dtype:
    return np.dtype(dt).newbyteorder("<") if np.dtype(dt).itemsize > 1 else np.dtype(dt)


# The dtype table. Source: safetensors format spec (dtype names), torch/_utils.py + torch.storage
# (typed storage class names), ml_dtypes (bfloat16, float8_e4m3fn, float8_e5m2).
_TABLE = [
    # name       numpy                         torch_name        kind     short
    ("F64", _le(np.float64), "float64", "float", "fp64"),
    ("F32", _le(np.float32), "float32", "float", "fp32"),
    ("F16", _le(np.float16), "float16", "float", "fp16"),
    ("BF16", _le(ml_dtypes.bfloat16), "bfloat16", "float", "bf16"),
    ("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn", "float", "fp8-e4m3fn"),
    ("F8_E5M2", np.dtype(ml_dtypes.float8_e5m2), "float8_e5m2", "float", "fp8-e5m2"),
    ("I64", _le(np.int64), "int64", "int", "int64"),
    ("I32", _le(np.int32), "int32", "int", "int32"),
    ("I16", _le(np.int16), "int16", "int", "int16"),
    ("I8", np.dtype(np.int8), "int8", "int", "int8"),
    ("U64", _le(np.uint64), "uint64", "uint", "uint64"),
    ("U32", _le(np.uint32), "uint32", "uint", "uint32"),
    ("U16", _le(np.uint16), "uint16", "uint", "uint16"),
    ("U8", np.dtype(np.uint8), "uint8", "uint", "uint8"),
    ("BOOL", np.dtype(np.bool_), "bool", "bool", "bool"),
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
    nd = np.dtype(arr_dtype)
    for d in DTYPES.values():
        if d.numpy.kind == nd.kind and d.numpy.itemsize == nd.itemsize and d.numpy.name == nd.newbyteorder("<").name:
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
    loader: Callable[[], np.ndarray] = field(repr=False)
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

    def read(self) -> np.ndarray:
        """The values as a numpy array of `self.dtype` and `self.shape` (may be a read-only view)."""
        arr = self.loader()
        if arr.shape != tuple(self.shape):
            arr = arr.reshape(self.shape)
        return arr


def from_array(name: str, arr: np.ndarray) -> LazyTensor:
    """A LazyTensor over an in-memory array (for computed tensors and tests)."""
    return LazyTensor(name, dtype_of_numpy(arr.dtype), tuple(arr.shape), lambda: arr)
