"""Our own pickle interpreter: reads what a checkpoint holds without running anything it names.

No `pickle.Unpickler`, no import, no call of anything from the file. Each opcode is interpreted
here exactly as CPython's C unpickler (`Modules/_pickle.c`) would, so what we see is what
`torch.load` would run; globals are resolved ONLY through `ALLOWLIST`, a table of
(module, name) -> our own constructor that builds inert values (tensor references, plain dicts,
numbers). Anything else stops reading with `UnsafeFileError` naming the global or opcode and its
offset. Work is bounded by the pickle's size (memo, stack, copies, nesting), so expansion bombs
fail with our own `FormatError` instead of exhausting memory.

Sources: CPython `Lib/pickle.py` + `Modules/_pickle.c` (opcode semantics, FRAME handling of the
C unpickler, `_compat_pickle` names), `torch/_utils.py` (rebuild functions and their arguments),
`torch/_weights_only_unpickler.py` (what torch itself allows), numpy `_core/multiarray`
(scalar / _reconstruct / dtype pickled forms).
"""
from __future__ import annotations

import codecs
import math
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

from sdtk.errors import FormatError, UnsafeFileError, UnsupportedFormatError
from sdtk.tensors import DTYPES, DType, geometry_problem, may_overlap

HIGHEST_PROTOCOL = 5  # CPython 3.8+
MAX_LONG_BYTES = 1 << 16  # LONG1/LONG4 operands; torch never writes more than 9 bytes
MAX_KEY_DEPTH = 8  # tuples used as dict keys / set items (bounds hashing recursion)
# Values inside one dict key / set item, counted as a tree (a memo reference counted each time it
# is reached): hashing and comparing a key walk every path, so a tuple DAG built from memo
# references (t1 = (t0, t0), t2 = (t1, t1), ...) costs 2^depth; real keys are strings, numbers
# and small tuples.
MAX_KEY_NODES = 256
# A tensor viewing more bytes than its storage holds (a broadcast, stride-0 view) is refused
# beyond this size: its bytes would be invented from nothing when read.
MAX_BROADCAST_BYTES = 1 << 20
COPY_BUDGET_FACTOR = 16  # elements copied by calls (set(), OrderedDict(), encode) <= 16x pickle size


# --------------------------------------------------------------------------------------------
# The inert values our constructors build (never objects of the file's choosing)


class ODict(dict):
    """An `collections.OrderedDict` instance (a plain ordered dict; BUILD may set attributes
    such as torch's `_metadata`, which we keep aside and never use)."""

    __slots__ = ("attributes",)

    def __init__(self, *args):
        super().__init__(*args)
        self.attributes: Dict[str, Any] = {}


@dataclass(frozen=True, eq=False)
class ClassToken:
    """A class named by the file that we only ever hold (a dict key, an argument), never call."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True, eq=False)
class StorageType:
    """`torch.FloatStorage` & co (dtype fixed) or `torch.storage.UntypedStorage` (dtype None)."""

    torch_name: str
    dtype: Optional[DType]  # None: untyped (bytes), or a dtype sdtk does not support
    supported: bool = True


@dataclass(frozen=True, eq=False)
class TorchDType:
    """A `torch.<dtype>` global (as passed to `_rebuild_tensor_v3`)."""

    torch_name: str
    dtype: Optional[DType]  # None for dtypes sdtk does not support (complex, quantised...)


@dataclass(eq=False)
class StorageRef:
    """A storage named by a persistent id; the reader says where its bytes are."""

    key: str
    storage_type: StorageType
    location: str
    numel: int  # elements of storage_type.dtype, or bytes when untyped
    nbytes: int
    handle: Any = None  # reader-private: where the bytes live
    base_offset: int = 0  # bytes into `handle` (legacy view storages)


@dataclass(eq=False)
class TensorRef:
    """A tensor rebuilt by `_rebuild_tensor_v2/v3`: a view of a storage, no bytes read."""

    storage: StorageRef
    offset: int  # in elements
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: Optional[DType]
    torch_dtype: str
    requires_grad: bool = False
    overlapping: bool = False  # a strided view that reaches some storage element twice


@dataclass(eq=False)
class ModuleState:
    """An allowlisted `nn.Module` container (ParameterDict): its pickled `__dict__`."""

    class_name: str
    state: Dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class NumpyDType:
    """`numpy.dtype(typestr, align, copy)` plus its BUILD state; only plain numeric kinds."""

    typestr: str
    byteorder: str = "<"

    def numpy(self) -> np.dtype:
        import numpy as np

        if not _NUMPY_TYPESTR.match(self.typestr):
            raise ValueError(f"numpy dtype {self.typestr!r} is not a plain numeric type")
        dt = np.dtype(self.typestr)
        return dt.newbyteorder(">") if self.byteorder == ">" else dt.newbyteorder("<")


@dataclass(eq=False)
class NumpyArray:
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` until BUILD gives its data;
    `value` is then a plain nested list."""

    value: Any = None
    built: bool = False


# --------------------------------------------------------------------------------------------
# Errors with the offset of the opcode being run


class PickleError(FormatError):
    pass


# --------------------------------------------------------------------------------------------
# The allowlist: (module, name) -> what our interpreter does with it.


@dataclass(frozen=True)
class Allowed:
    """One allowlisted global. `call(vm, args)` for REDUCE/INST/OBJ, `new(vm, args)` for NEWOBJ;
    a value with neither is only ever held (a storage type in a persistent id, a dtype, a class
    used as a dict key)."""

    value: Callable[[str, str], Any]  # (module, name) -> the value pushed on the stack
    call: Optional[Callable[["PickleVM", tuple], Any]] = None
    new: Optional[Callable[["PickleVM", tuple], Any]] = None


@dataclass(frozen=True, eq=False)
class Callee:
    """A pushed allowlisted global that can be called (its behaviour is ours)."""

    module: str
    name: str
    call: Optional[Callable] = None
    new: Optional[Callable] = None

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


def _ordered_dict(vm: "PickleVM", args: tuple) -> ODict:
    if len(args) > 1:
        raise vm.bad("OrderedDict() takes at most one argument")
    out = ODict()
    if args:
        items = args[0]
        if isinstance(items, dict):
            items = list(items.items())
        if not isinstance(items, (list, tuple)):
            raise vm.bad("OrderedDict() argument must be a list of pairs")
        vm.charge(len(items))
        for pair in items:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise vm.bad("OrderedDict() argument must be a list of pairs")
            out[vm.key(pair[0])] = pair[1]
    return out


def _empty_hooks(vm: "PickleVM", hooks: Any) -> None:
    if not isinstance(hooks, dict) or hooks:
        raise vm.bad("tensor backward_hooks must be an empty OrderedDict")


def _int_tuple(vm: "PickleVM", value: Any, what: str) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    raise vm.bad(f"tensor {what} must be a tuple of integers")


def _check_metadata(vm: "PickleVM", metadata: Any) -> None:
    if metadata is None or metadata == {}:
        return
    if not isinstance(metadata, dict):
        raise vm.bad("tensor metadata must be a dict")
    if any(metadata.values()):  # torch/_utils.py get_tensor_metadata: conj/neg bits
        raise UnsupportedFormatError(vm.path, f"{vm.where()}: tensor with lazy conj/neg bits {sorted(metadata)} is not supported")


def _tensor(vm: "PickleVM", storage: Any, offset: Any, size: Any, stride: Any, dt: Optional[DType], torch_name: str, requires_grad: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise vm.bad("tensor storage is not a storage persistent id")
    if type(offset) is not int or offset < 0:
        raise vm.bad("tensor storage_offset must be a non-negative integer")
    shape = _int_tuple(vm, size, "size")
    strides = _int_tuple(vm, stride, "stride")
    if len(shape) != len(strides):
        raise vm.bad(f"tensor size {shape} and stride {strides} differ in length")
    if any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise vm.bad("tensor size and stride must be non-negative")
    if not isinstance(requires_grad, bool):
        raise vm.bad("tensor requires_grad must be a bool")
    overlapping = False
    if dt is not None:
        problem = geometry_problem(shape, dt.itemsize) or geometry_problem(strides, 1)
        if problem:
            raise vm.bad(f"tensor {problem}")
        count = math.prod(shape)
        if count > 0:
            extent = offset + sum((d - 1) * s for d, s in zip(shape, strides)) + 1
            if extent * dt.itemsize > storage.nbytes:
                raise vm.bad(f"tensor of size {list(shape)} (offset {offset}, stride {list(strides)}) reaches past the end "
                             f"of its storage {storage.key!r} ({storage.nbytes} bytes)")
            # torch saves a broadcast view (expand, stride 0) as it is: its elements can outnumber
            # its storage, and reading it out multiplies the bytes (a 625-byte file declaring a
            # 2^40-element view). A real checkpoint never needs a tensor much larger than its
            # storage: allowed up to MAX_BROADCAST_BYTES (and reported), refused beyond.
            if count * dt.itemsize > max(storage.nbytes, MAX_BROADCAST_BYTES):
                raise vm.bad(f"tensor of size {list(shape)} (stride {list(strides)}) needs {count * dt.itemsize} bytes from its "
                             f"{storage.nbytes}-byte storage {storage.key!r}: a broadcast view far larger than its data; refused")
            overlapping = may_overlap(shape, strides)
    return TensorRef(storage, offset, shape, strides, dt, torch_name, requires_grad, overlapping)


def _rebuild_tensor_v2(vm: "PickleVM", args: tuple) -> TensorRef:
    # torch/_utils.py: _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None)
    if len(args) not in (6, 7):
        raise vm.bad(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    _empty_hooks(vm, hooks)
    _check_metadata(vm, args[6] if len(args) == 7 else None)
    if not isinstance(storage, StorageRef):
        raise vm.bad("tensor storage is not a storage persistent id")
    st = storage.storage_type
    if st.dtype is None:
        if st.supported:
            raise vm.bad("_rebuild_tensor_v2 needs a typed storage (UntypedStorage goes with _rebuild_tensor_v3)")
        raise UnsupportedFormatError(vm.path, f"{vm.where()}: tensors of torch.{st.torch_name} are not supported by sdtk")
    return _tensor(vm, storage, offset, size, stride, st.dtype, st.dtype.torch_name, requires_grad)


def _rebuild_tensor_v3(vm: "PickleVM", args: tuple) -> TensorRef:
    # torch/_utils.py: _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None)
    if len(args) not in (7, 8):
        raise vm.bad(f"_rebuild_tensor_v3 takes 7 or 8 arguments, got {len(args)}")
    storage, offset, size, stride, requires_grad, hooks, tdt = args[:7]
    _empty_hooks(vm, hooks)
    _check_metadata(vm, args[7] if len(args) == 8 else None)
    if not isinstance(tdt, TorchDType):
        raise vm.bad("_rebuild_tensor_v3 dtype argument is not a torch dtype")
    if tdt.dtype is None:
        raise UnsupportedFormatError(vm.path, f"{vm.where()}: tensors of dtype torch.{tdt.torch_name} are not supported by sdtk")
    if not isinstance(storage, StorageRef):
        raise vm.bad("tensor storage is not a storage persistent id")
    if storage.storage_type.dtype is not None and storage.storage_type.dtype != tdt.dtype:
        raise vm.bad(f"_rebuild_tensor_v3 dtype {tdt.torch_name} differs from its typed storage")
    return _tensor(vm, storage, offset, size, stride, tdt.dtype, tdt.torch_name, requires_grad)


def _rebuild_parameter(vm: "PickleVM", args: tuple) -> TensorRef:
    # torch/_utils.py: _rebuild_parameter(data, requires_grad, backward_hooks)
    if len(args) != 3 or not isinstance(args[0], TensorRef) or not isinstance(args[1], bool):
        raise vm.bad("_rebuild_parameter takes (tensor, requires_grad, backward_hooks)")
    _empty_hooks(vm, args[2])
    return args[0]


def _builtin_set(vm: "PickleVM", args: tuple):
    if len(args) > 1:
        raise vm.bad("set() takes at most one argument")
    items = args[0] if args else []
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise vm.bad("set() argument must be a list")
    vm.charge(len(items))
    return {vm.key(i) for i in items}


def _builtin_frozenset(vm: "PickleVM", args: tuple):
    return frozenset(_builtin_set(vm, args))


def _torch_size(vm: "PickleVM", args: tuple):
    if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not all(type(v) is int for v in args[0]):
        raise vm.bad("torch.Size takes a tuple of integers")
    vm.charge(len(args[0]))
    return tuple(args[0])


def _torch_device(vm: "PickleVM", args: tuple):
    if not 1 <= len(args) <= 2 or not isinstance(args[0], str) or (len(args) == 2 and type(args[1]) is not int):
        raise vm.bad("torch.device takes a device type string and an optional index")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


def _codecs_encode(vm: "PickleVM", args: tuple) -> bytes:
    # numpy pickles raw bytes at protocol 2 as _codecs.encode(<latin-1 str>, 'latin1')
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise vm.bad("_codecs.encode is allowed only as encode(str, 'latin1') (numpy's byte strings)")
    vm.charge(len(args[0]))
    try:
        return args[0].encode("latin-1")
    except UnicodeEncodeError:
        raise vm.bad("_codecs.encode: string is not latin-1") from None


_NUMPY_TYPESTR = re.compile(r"^(b1|[iu](1|2|4|8)|f(2|4|8)|c(8|16))$")
_NUMPY_OBJECT = "O8"  # held inertly so a scan sees what the array holds; its data is refused at BUILD


def _numpy_dtype(vm: "PickleVM", args: tuple) -> NumpyDType:
    # numpy pickles a dtype as numpy.dtype(typestr, align, copy) + BUILD (version, byteorder, ...)
    if not 1 <= len(args) <= 3 or not isinstance(args[0], str):
        raise vm.bad("numpy.dtype takes a type string")
    if args[0] == _NUMPY_OBJECT:
        return NumpyDType(args[0])
    if not _NUMPY_TYPESTR.match(args[0]):
        raise vm.bad(f"numpy dtype {args[0]!r} is not a plain numeric type (object and structured arrays are refused)")
    return NumpyDType(args[0])


def _numpy_scalar(vm: "PickleVM", args: tuple):
    # numpy.core.multiarray.scalar(dtype, raw bytes) -> a Python number
    import numpy as np

    if len(args) != 2 or not isinstance(args[0], NumpyDType) or not isinstance(args[1], (bytes, str)):
        raise vm.bad("numpy scalar takes (dtype, bytes)")
    if args[0].typestr == _NUMPY_OBJECT:
        raise vm.bad("numpy object scalars are refused")
    raw = args[1].encode("latin-1") if isinstance(args[1], str) else args[1]
    dt = args[0].numpy()
    if len(raw) != dt.itemsize:
        raise vm.bad(f"numpy scalar of {dt} needs {dt.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dt)[0].item()


def _numpy_reconstruct(vm: "PickleVM", args: tuple) -> NumpyArray:
    # numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b'); the data comes with BUILD
    if len(args) != 3 or not (isinstance(args[0], ClassToken) and args[0].name == "ndarray"):
        raise vm.bad("numpy _reconstruct is allowed only for numpy.ndarray")
    return NumpyArray()


def _refuse_call(vm: "PickleVM", args: tuple):
    raise UnsafeFileError(vm.path, f"{vm.where()}: the file calls {vm.current_callee}, which sdtk only accepts as an inert value")


def _module_new(vm: "PickleVM", args: tuple) -> ModuleState:
    if args:
        raise vm.bad("ParameterDict is created without arguments")
    return ModuleState(str(vm.current_callee))


_STORAGE_DTYPES = {
    # torch typed storage class -> safetensors dtype name (torch/storage.py _LegacyStorage subclasses)
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
_UNSUPPORTED_STORAGES = (  # real torch storage classes sdtk refuses by name (torch/storage.py)
    "ComplexFloatStorage", "ComplexDoubleStorage", "QInt8Storage", "QUInt8Storage", "QInt32Storage",
    "QUInt4x2Storage", "QUInt2x4Storage",
)
_TORCH_DTYPES = {d.torch_name: d for d in DTYPES.values()}  # torch.float8_e4m3fn, torch.uint16...
_UNSUPPORTED_TORCH_DTYPES = (  # torch dtypes sdtk refuses by name (torch/_C/_VariableFunctions dtypes)
    "complex32", "complex64", "complex128", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "bits8", "bits16",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "int1", "int2", "int3", "int4",
)


def _build_allowlist() -> Dict[Tuple[str, str], Allowed]:
    table: Dict[Tuple[str, str], Allowed] = {}

    def callee(call=None, new=None):
        return Allowed(lambda m, n: Callee(m, n, call, new), call=call, new=new)

    token = Allowed(lambda m, n: ClassToken(m, n))
    # Always (torch/_weights_only_unpickler.py _get_allowed_globals; every torch.save of a state dict)
    table["collections", "OrderedDict"] = callee(_ordered_dict, lambda vm, a: _ordered_dict(vm, a))
    table["torch._utils", "_rebuild_tensor_v2"] = callee(_rebuild_tensor_v2)
    # torch >= 2.1 for dtypes without a typed storage class (torch/_tensor.py _reduce_ex_internal)
    table["torch._utils", "_rebuild_tensor_v3"] = callee(_rebuild_tensor_v3)
    for name, st in _STORAGE_DTYPES.items():
        table["torch", name] = Allowed(lambda m, n, st=st: StorageType(n, DTYPES[st]))
    for name in _UNSUPPORTED_STORAGES:
        table["torch", name] = Allowed(lambda m, n: StorageType(n, None, supported=False))
    table["torch.storage", "UntypedStorage"] = Allowed(lambda m, n: StorageType(n, None))
    table["torch", "UntypedStorage"] = Allowed(lambda m, n: StorageType(n, None))  # torch.UntypedStorage alias
    for name, dt in _TORCH_DTYPES.items():
        table["torch", name] = Allowed(lambda m, n, dt=dt: TorchDType(n, dt))
    for name in _UNSUPPORTED_TORCH_DTYPES:
        table["torch", name] = Allowed(lambda m, n: TorchDType(n, None))
    table["torch", "Size"] = callee(_torch_size)  # torch/_weights_only_unpickler.py (hyper-parameters)
    table["torch", "device"] = callee(_torch_device)  # torch/_weights_only_unpickler.py
    # Embeddings and hypernetworks (textual_inversion ParameterDict; A1111 hypernetworks)
    table["torch.nn.modules.container", "ParameterDict"] = callee(None, _module_new)
    table["torch._utils", "_rebuild_parameter"] = callee(_rebuild_parameter)
    table["builtins", "set"] = callee(_builtin_set)
    table["builtins", "frozenset"] = callee(_builtin_frozenset)
    # PyTorch Lightning training checkpoints (sd-v1-x full, wd-v1-3, LDSR): the callback class is a dict key
    table["pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"] = Allowed(lambda m, n: Callee(m, n, _refuse_call, _refuse_call))
    table["lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"] = Allowed(lambda m, n: Callee(m, n, _refuse_call, _refuse_call))
    # numpy scalars and arrays from LR-scheduler state; both numpy 1 (numpy.core) and 2 (numpy._core)
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[core, "scalar"] = callee(_numpy_scalar)
        table[core, "_reconstruct"] = callee(_numpy_reconstruct)
    table["numpy", "ndarray"] = token
    table["numpy", "dtype"] = callee(_numpy_dtype)
    table["_codecs", "encode"] = callee(_codecs_encode)
    return table


ALLOWLIST: Dict[Tuple[str, str], Allowed] = _build_allowlist()

# Python 2 names CPython maps at protocol < 3 (Lib/_compat_pickle.py IMPORT_MAPPING), for allowlisted names only.
_COMPAT_MODULES = {"__builtin__": "builtins"}


# --------------------------------------------------------------------------------------------
# The interpreter


class _Mark:
    __slots__ = ()


class PickleVM:
    """Run one pickle from `data[start:]`. `persistent_load(pid) -> value` resolves storages."""

    def __init__(self, data, *, path: Optional[str] = None, what: str = "pickle",
                 persistent_load: Optional[Callable[[Any], Any]] = None, base_offset: int = 0):
        self.data = data
        self.path = path
        self.what = what
        self.persistent_load = persistent_load
        self.base_offset = base_offset  # offset of `data` in the file, for messages
        self.size = len(data)
        self.pos = 0
        self.op_pos = 0
        self.proto = 0
        self.stack: List[Any] = []
        self.marks: List[int] = []
        self.fence = 0
        self.memo: Dict[int, Any] = {}
        self.current_callee: Any = None
        self.globals_seen: List[str] = []
        self.budget = COPY_BUDGET_FACTOR * len(data) + 4096
        self.ops = 0

    # -- messages -----------------------------------------------------------------------------
    def where(self) -> str:
        return f"{self.what} offset {self.base_offset + self.op_pos}"

    def bad(self, problem: str) -> PickleError:
        return PickleError(self.path, f"{self.where()}: {problem}")

    def unsafe(self, problem: str) -> UnsafeFileError:
        return UnsafeFileError(self.path, f"{self.where()}: {problem}")

    def charge(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise self.bad("the pickle builds far more data than its size allows (expansion bomb)")

    def key(self, obj: Any) -> Any:
        """Check a dict key / set item is hashable with bounded work, as CPython would require:
        at most MAX_KEY_DEPTH levels and MAX_KEY_NODES values counted along every path (the work
        `hash()` and `==` do on it), so keys never cost more than a constant each."""
        if type(obj) is int and obj.bit_length() > 4096:
            raise self.bad("integer dict key longer than 4096 bits")
        if obj is None or isinstance(obj, (str, int, float, bytes, bool, complex)):
            return obj
        todo = [(obj, 0)]
        nodes = 0
        while todo:
            item, depth = todo.pop()
            nodes += 1
            if nodes > MAX_KEY_NODES:
                raise self.bad(f"dict key or set item made of more than {MAX_KEY_NODES} values (hashing bomb)")
            if type(item) is int and item.bit_length() > 4096:
                raise self.bad("integer dict key longer than 4096 bits")
            if item is None or isinstance(item, (str, int, float, bytes, bool, complex)):
                continue
            if isinstance(item, (tuple, frozenset)):
                if depth >= MAX_KEY_DEPTH:
                    raise self.bad("dict key nested too deeply")
                if len(item) > MAX_KEY_NODES:
                    raise self.bad(f"dict key or set item made of more than {MAX_KEY_NODES} values (hashing bomb)")
                todo.extend((v, depth + 1) for v in item)
                continue
            if isinstance(item, (ClassToken, Callee, StorageType, TorchDType, TensorRef, StorageRef)):
                continue  # hashed by identity
            raise self.bad(f"unhashable {type(item).__name__} used as a dict key or set item")
        return obj

    # -- reading ------------------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self.size:
            raise self.bad("pickle data was truncated")
        self.pos = end
        chunk = self.data[pos:end]
        return chunk if type(chunk) is bytes else bytes(chunk)

    def readline(self) -> bytes:
        """Up to the next newline. bytes, bytearray and mmap search in place (`find` from the
        position); other buffers (memoryview) in growing chunks, never copying the rest of the
        data per line (protocol-0 pickles are one opcode per line)."""
        data, pos = self.data, self.pos
        find = getattr(data, "find", None)
        if find is not None:
            end = find(b"\n", pos)
        else:
            end, chunk = -1, 64
            start = pos
            while start < self.size:
                stop = min(self.size, start + chunk)
                found = bytes(data[start:stop]).find(b"\n")
                if found >= 0:
                    end = start + found
                    break
                start, chunk = stop, chunk * 2
        if end < 0:
            raise self.bad("pickle data was truncated (missing end of line)")
        line = bytes(data[pos:end])
        self.pos = end + 1
        return line

    # -- stack (C unpickler semantics: pops never cross the last MARK) ------------------------
    # self.fence: index of the last MARK (0 without marks), kept up to date by mark/pop_mark

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if len(self.stack) <= self.fence:
            raise self.bad("unpickling stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if len(self.stack) <= self.fence:
            raise self.bad("unpickling stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> List[Any]:
        if not self.marks:
            raise self.bad("could not find MARK")
        start = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[start:]
        del self.stack[start:]
        return items

    # -- globals ------------------------------------------------------------------------------
    def resolve_global(self, module: str, name: str) -> Any:
        shown = f"{module}.{name}"
        self.globals_seen.append(shown)
        if "." in name:
            raise self.unsafe(f"global {shown} uses a dotted name (attribute-lookup trick); refused, nothing was executed")
        if self.proto < 3 and module in _COMPAT_MODULES:
            module = _COMPAT_MODULES[module]
        entry = ALLOWLIST.get((module, name))
        if entry is None:
            raise self.unsafe(f"global {shown} is not allowed in a model file (it could run code); refused, nothing was executed")
        return entry.value(module, name)

    def call(self, func: Any, args: Any, how: str) -> Any:
        if not isinstance(args, tuple):
            raise self.bad(f"{how}: argument list must be a tuple")
        if not isinstance(func, Callee):
            raise self.bad(f"{how}: the file calls a {type(func).__name__} value")
        self.current_callee = func
        if func.call is None:
            raise self.unsafe(f"{how}: the file calls {func}, which sdtk only accepts as an inert value")
        return func.call(self, args)

    def new(self, cls: Any, args: Any, how: str) -> Any:
        if not isinstance(args, tuple):
            raise self.bad(f"{how}: argument list must be a tuple")
        if not isinstance(cls, Callee) or cls.new is None:
            raise self.unsafe(f"{how}: the file instantiates {cls if isinstance(cls, Callee) else type(cls).__name__}, which is not allowed")
        self.current_callee = cls
        return cls.new(self, args)

    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, ODict):
            if isinstance(state, tuple) and len(state) == 2:
                state = state[0] or {}
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise self.bad("BUILD on an OrderedDict with a state that is not a dict of attributes")
            obj.attributes.update(state)
        elif isinstance(obj, ModuleState):
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise self.bad("BUILD on a ParameterDict with a state that is not a dict")
            obj.state.update(state)
        elif isinstance(obj, NumpyDType):
            # numpy arraydescr_setstate: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
                raise self.bad("BUILD on a numpy dtype with an unexpected state")
            if any(s is not None for s in state[2:5]):
                raise self.bad("structured numpy dtypes are not supported")
            obj.byteorder = state[1]
        elif isinstance(obj, NumpyArray):
            self.build_array(obj, state)
        else:
            raise self.bad(f"BUILD on a {type(obj).__name__} value is not allowed")

    def build_array(self, obj: NumpyArray, state: Any) -> None:
        # numpy array_setstate: (version, shape, dtype, is_fortran, rawdata)
        import numpy as np

        if obj.built:
            raise self.bad("BUILD twice on a numpy array")
        if not isinstance(state, tuple) or len(state) != 5:
            raise self.bad("BUILD on a numpy array with an unexpected state")
        _version, shape, dt, fortran, raw = state
        if not isinstance(dt, NumpyDType) or dt.typestr == _NUMPY_OBJECT:
            raise self.bad("numpy object arrays are refused (their elements are pickled objects)")
        shape = _int_tuple(self, shape, "numpy shape")
        if isinstance(raw, str):
            raw = raw.encode("latin-1", errors="strict")
        if not isinstance(raw, (bytes, bytearray)):
            raise self.bad("numpy array data must be bytes (object arrays are refused)")
        npdt = dt.numpy()
        if any(d < 0 for d in shape) or math.prod(shape) * npdt.itemsize != len(raw):
            raise self.bad(f"numpy array of shape {list(shape)} and dtype {npdt} does not match its {len(raw)} bytes")
        self.charge(len(raw))
        arr = np.frombuffer(bytes(raw), dtype=npdt).reshape(shape, order="F" if fortran else "C")
        obj.value = arr.tolist()
        obj.built = True

    # -- the loop -----------------------------------------------------------------------------
    def run(self, start: int = 0) -> Tuple[Any, int]:
        """Interpret one pickle from `start`; return (value, offset after STOP)."""
        try:
            return self._run(start)
        except (ValueError, TypeError, OverflowError, IndexError, KeyError, struct.error) as e:
            raise self.bad(f"malformed pickle ({type(e).__name__})") from None
        except RecursionError:
            raise self.bad("pickle nested too deeply") from None

    def _run(self, start: int) -> Tuple[Any, int]:
        self.pos = start
        data = self.data
        n = len(data)
        table = _TABLE
        ops = 0
        try:
            while True:
                pos = self.pos
                if pos >= n:
                    self.op_pos = pos
                    raise self.bad("pickle data was truncated (no STOP opcode)")
                self.op_pos = pos
                op = data[pos]
                self.pos = pos + 1
                ops += 1
                handler = table[op]
                if handler is None:
                    if op in _REFUSED_OPCODES:
                        raise self.unsafe(f"opcode {_REFUSED_OPCODES[op]} is not allowed in a model file")
                    raise self.bad(f"invalid pickle opcode 0x{op:02x}")
                if handler(self) is _STOP:
                    value = self.pop()
                    return value, self.pos
        finally:
            self.ops += ops

    # -- opcode handlers ----------------------------------------------------------------------
    def op_mark(self):
        self.fence = len(self.stack)
        self.marks.append(self.fence)

    def op_stop(self):
        return _STOP

    def op_pop(self):
        if self.marks and self.marks[-1] == len(self.stack):
            self.marks.pop()  # C unpickler: POP right after MARK discards the mark
            self.fence = self.marks[-1] if self.marks else 0
        else:
            self.pop()

    def op_pop_mark(self):
        self.pop_mark()

    def op_dup(self):
        self.push(self.top())

    def op_float(self):
        line = self.readline()
        try:
            text = line.decode("ascii")
            if "_" in text or text != text.strip():
                raise ValueError
            self.push(float(text))
        except (ValueError, UnicodeDecodeError):
            raise self.bad("could not convert string to float") from None

    def op_int(self):
        line = self.readline()
        if line.isdigit() and len(line) < 18 and (line[0] != 0x30 or len(line) == 1):  # plain decimal: the common case
            self.stack.append(int(line))
            return
        if line == b"00":
            return self.push(False)
        if line == b"01":
            return self.push(True)
        self.push(self._parse_int(line, "INT"))

    def op_long(self):
        line = self.readline()
        if line.endswith(b"L"):
            line = line[:-1]
        self.push(self._parse_int(line, "LONG"))

    def _parse_int(self, line: bytes, op: str) -> int:
        # C strtol/PyLong_FromString with base 0: 0x.. hex, leading 0 octal (Python 2 style)
        try:
            text = line.decode("ascii").strip()
            sign = -1 if text.startswith("-") else 1
            body = text.lstrip("+-")
            if len(body) > 4000:
                raise ValueError
            if len(body) > 1 and body[0] == "0" and body[1] not in "xXoObB":
                value = int(body, 8)
            else:
                value = int(body, 0)
            return sign * value
        except (ValueError, UnicodeDecodeError):
            raise self.bad(f"invalid literal for {op}") from None

    def op_binint(self):
        pos = self.pos
        if pos + 4 > self.size:
            raise self.bad("pickle data was truncated")
        self.pos = pos + 4
        self.stack.append(_LE_INT(self.data, pos)[0])

    def op_binint1(self):
        pos = self.pos
        if pos >= self.size:
            raise self.bad("pickle data was truncated")
        self.pos = pos + 1
        self.stack.append(self.data[pos])

    def op_binint2(self):
        self.push(struct.unpack("<H", self.read(2))[0])

    def op_long1(self):
        size = self.read(1)[0]
        self.push(int.from_bytes(self.read(size), "little", signed=True))

    def op_long4(self):
        (size,) = struct.unpack("<i", self.read(4))
        if size < 0:
            raise self.bad("LONG pickle has negative byte count")
        if size > MAX_LONG_BYTES:
            raise self.bad(f"LONG4 of {size} bytes is absurd for a model file")
        self.push(int.from_bytes(self.read(size), "little", signed=True))

    def op_binfloat(self):
        pos = self.pos
        if pos + 8 > self.size:
            raise self.bad("pickle data was truncated")
        self.pos = pos + 8
        self.stack.append(_BE_DOUBLE(self.data, pos)[0])

    def op_none(self):
        self.push(None)

    def op_true(self):
        self.push(True)

    def op_false(self):
        self.push(False)

    def _decode(self, raw: bytes) -> str:
        # torch.load passes encoding='utf-8' for Python 2 strings (torch/serialization.py)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("Python 2 string is not valid UTF-8") from None

    def op_string(self):
        line = self.readline()
        if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
            raise self.bad("the STRING opcode argument must be quoted")
        try:
            raw = codecs.escape_decode(line[1:-1])[0]
        except ValueError:
            raise self.bad("invalid escape in STRING") from None
        self.push(self._decode(raw))

    def op_binstring(self):
        (size,) = struct.unpack("<i", self.read(4))
        if size < 0:
            raise self.bad("BINSTRING pickle has negative byte count")
        self.push(self._decode(self.read(size)))

    def op_short_binstring(self):
        self.push(self._decode(self.read(self.read(1)[0])))

    def op_unicode(self):
        try:
            self.push(self.readline().decode("raw-unicode-escape"))
        except UnicodeDecodeError:
            raise self.bad("invalid UNICODE string") from None

    def _utf8(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise self.bad("string is not valid UTF-8") from None

    def op_binunicode(self):
        self.push(self._utf8(self.read(struct.unpack("<I", self.read(4))[0])))

    def op_short_binunicode(self):
        self.push(self._utf8(self.read(self.read(1)[0])))

    def op_binunicode8(self):
        self.push(self._utf8(self.read(struct.unpack("<Q", self.read(8))[0])))

    def op_binbytes(self):
        self.push(self.read(struct.unpack("<I", self.read(4))[0]))

    def op_short_binbytes(self):
        self.push(self.read(self.read(1)[0]))

    def op_binbytes8(self):
        self.push(self.read(struct.unpack("<Q", self.read(8))[0]))

    def op_bytearray8(self):
        self.push(bytearray(self.read(struct.unpack("<Q", self.read(8))[0])))

    def op_out_of_band(self):
        raise self.bad("pickle stream refers to out-of-band data but no buffers were given")

    def op_empty_tuple(self):
        self.push(())

    def op_tuple(self):
        self.push(tuple(self.pop_mark()))

    def op_tuple1(self):
        self.push((self.pop(),))

    def op_tuple2(self):
        b = self.pop()
        a = self.pop()
        self.push((a, b))

    def op_tuple3(self):
        c = self.pop()
        b = self.pop()
        a = self.pop()
        self.push((a, b, c))

    def op_empty_list(self):
        self.push([])

    def op_list(self):
        self.push(self.pop_mark())

    def op_empty_dict(self):
        self.push({})

    def op_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise self.bad("odd number of items for DICT")
        d = {}
        for i in range(0, len(items), 2):
            d[self.key(items[i])] = items[i + 1]
        self.push(d)

    def op_empty_set(self):
        self.push(set())

    def op_frozenset(self):
        self.push(frozenset(self.key(i) for i in self.pop_mark()))

    def op_additems(self):
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, set):
            raise self.bad("ADDITEMS on a value that is not a set")
        target.update(self.key(i) for i in items)

    def op_append(self):
        stack = self.stack
        if len(stack) < self.fence + 2:
            raise self.bad("unpickling stack underflow")
        value = stack.pop()
        target = stack[-1]
        if type(target) is not list:
            raise self.bad("APPEND on a value that is not a list")
        target.append(value)

    def op_appends(self):
        items = self.pop_mark()
        target = self.top()
        if type(target) is not list:
            raise self.bad("APPENDS on a value that is not a list")
        target.extend(items)

    def op_setitem(self):
        value = self.pop()
        key = self.pop()
        target = self.top()
        if not isinstance(target, dict):
            raise self.bad("SETITEM on a value that is not a dict")
        target[self.key(key)] = value

    def op_setitems(self):
        items = self.pop_mark()
        target = self.top()
        if len(items) % 2:
            raise self.bad("odd number of items for SETITEMS")
        if not isinstance(target, dict):
            raise self.bad("SETITEMS on a value that is not a dict")
        for i in range(0, len(items), 2):
            target[self.key(items[i])] = items[i + 1]

    def _memo_index(self, line: bytes, op: str) -> int:
        try:
            text = line.decode("ascii")
            if not text or not text.lstrip("-").isdigit():
                raise ValueError
            return int(text)
        except (ValueError, UnicodeDecodeError):
            raise self.bad(f"invalid {op} index") from None

    def _get(self, idx: int):
        if idx not in self.memo:
            raise self.bad(f"memo value {idx} not found")
        self.push(self.memo[idx])

    def op_get(self):
        self._get(self._memo_index(self.readline(), "GET"))

    def op_binget(self):
        pos = self.pos
        if pos >= self.size:
            raise self.bad("pickle data was truncated")
        self.pos = pos + 1
        self._get(self.data[pos])

    def op_long_binget(self):
        self._get(struct.unpack("<I", self.read(4))[0])

    def _put(self, idx: int):
        if idx < 0:
            raise self.bad("negative PUT argument")
        self.memo[idx] = self.top()

    def op_put(self):
        self._put(self._memo_index(self.readline(), "PUT"))

    def op_binput(self):
        pos = self.pos
        if pos >= self.size:
            raise self.bad("pickle data was truncated")
        self.pos = pos + 1
        if len(self.stack) <= self.fence:
            raise self.bad("unpickling stack underflow")
        self.memo[self.data[pos]] = self.stack[-1]

    def op_long_binput(self):
        idx = struct.unpack("<I", self.read(4))[0]
        if len(self.stack) <= self.fence:
            raise self.bad("unpickling stack underflow")
        self.memo[idx] = self.stack[-1]

    def op_memoize(self):
        self.memo[len(self.memo)] = self.top()

    def op_proto(self):
        proto = self.read(1)[0]
        if proto > HIGHEST_PROTOCOL:
            raise self.bad(f"unsupported pickle protocol: {proto}")
        self.proto = proto

    def op_frame(self):
        # C unpickler (Modules/_pickle.c load_frame): the frame's bytes must all be present; the
        # opcodes inside are then read like any others (frames do not delimit opcodes), which is
        # exactly what we do: nothing can hide inside or across a frame.
        (size,) = struct.unpack("<Q", self.read(8))
        if size > (1 << 63) - 1 or self.pos + size > len(self.data):
            raise self.bad("pickle data was truncated (FRAME longer than the data)")

    def _global_line(self) -> str:
        raw = self.readline()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("global name is not valid UTF-8") from None

    def op_global(self):
        module = self._global_line()
        name = self._global_line()
        self.push(self.resolve_global(module, name))

    def op_stack_global(self):
        name = self.pop()
        module = self.pop()
        if not isinstance(name, str) or not isinstance(module, str):
            raise self.bad("STACK_GLOBAL requires str")
        self.push(self.resolve_global(module, name))

    def op_reduce(self):
        args = self.pop()
        func = self.pop()
        self.push(self.call(func, args, "REDUCE"))

    def op_build(self):
        state = self.pop()
        self.build(self.top(), state)

    def op_inst(self):
        module = self._global_line()
        name = self._global_line()
        cls = self.resolve_global(module, name)
        args = tuple(self.pop_mark())
        self.push(self.call(cls, args, "INST"))

    def op_obj(self):
        items = self.pop_mark()
        if not items:
            raise self.bad("OBJ without a class")
        self.push(self.call(items[0], tuple(items[1:]), "OBJ"))

    def op_newobj(self):
        args = self.pop()
        cls = self.pop()
        self.push(self.new(cls, args, "NEWOBJ"))

    def op_newobj_ex(self):
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        if kwargs:
            raise self.unsafe("NEWOBJ_EX with keyword arguments is not allowed")
        self.push(self.new(cls, args, "NEWOBJ_EX"))

    def op_persid(self):
        try:
            pid = self.readline().decode("ascii")
        except UnicodeDecodeError:
            raise self.bad("persistent IDs in protocol 0 must be ASCII strings") from None
        self._persistent(pid)

    def op_binpersid(self):
        self._persistent(self.pop())

    def _persistent(self, pid: Any):
        if self.persistent_load is None:
            raise self.bad("a persistent id (a torch storage) appears where none is expected")
        self.push(self.persistent_load(pid))


_STOP = object()
_BE_DOUBLE = struct.Struct(">d").unpack_from
_LE_INT = struct.Struct("<i").unpack_from

# opcode byte -> handler (pickletools / Lib/pickle.py opcode table)
_DISPATCH: Dict[int, Callable[[PickleVM], Any]] = {
    ord(k): v for k, v in {
        "(": PickleVM.op_mark, ".": PickleVM.op_stop, "0": PickleVM.op_pop, "1": PickleVM.op_pop_mark,
        "2": PickleVM.op_dup, "F": PickleVM.op_float, "I": PickleVM.op_int, "J": PickleVM.op_binint,
        "K": PickleVM.op_binint1, "L": PickleVM.op_long, "M": PickleVM.op_binint2, "N": PickleVM.op_none,
        "P": PickleVM.op_persid, "Q": PickleVM.op_binpersid, "R": PickleVM.op_reduce, "S": PickleVM.op_string,
        "T": PickleVM.op_binstring, "U": PickleVM.op_short_binstring, "V": PickleVM.op_unicode,
        "X": PickleVM.op_binunicode, "a": PickleVM.op_append, "b": PickleVM.op_build, "c": PickleVM.op_global,
        "d": PickleVM.op_dict, "}": PickleVM.op_empty_dict, "e": PickleVM.op_appends, "g": PickleVM.op_get,
        "h": PickleVM.op_binget, "i": PickleVM.op_inst, "j": PickleVM.op_long_binget, "l": PickleVM.op_list,
        "]": PickleVM.op_empty_list, "o": PickleVM.op_obj, "p": PickleVM.op_put, "q": PickleVM.op_binput,
        "r": PickleVM.op_long_binput, "s": PickleVM.op_setitem, "t": PickleVM.op_tuple,
        ")": PickleVM.op_empty_tuple, "u": PickleVM.op_setitems, "G": PickleVM.op_binfloat,
        # protocol 2
        "\x80": PickleVM.op_proto, "\x81": PickleVM.op_newobj, "\x85": PickleVM.op_tuple1,
        "\x86": PickleVM.op_tuple2, "\x87": PickleVM.op_tuple3, "\x88": PickleVM.op_true,
        "\x89": PickleVM.op_false, "\x8a": PickleVM.op_long1, "\x8b": PickleVM.op_long4,
        # protocol 3
        "B": PickleVM.op_binbytes, "C": PickleVM.op_short_binbytes,
        # protocol 4
        "\x8c": PickleVM.op_short_binunicode, "\x8d": PickleVM.op_binunicode8, "\x8e": PickleVM.op_binbytes8,
        "\x8f": PickleVM.op_empty_set, "\x90": PickleVM.op_additems, "\x91": PickleVM.op_frozenset,
        "\x92": PickleVM.op_newobj_ex, "\x93": PickleVM.op_stack_global, "\x94": PickleVM.op_memoize,
        "\x95": PickleVM.op_frame,
        # protocol 5
        "\x96": PickleVM.op_bytearray8, "\x97": PickleVM.op_out_of_band, "\x98": PickleVM.op_out_of_band,
    }.items()
}

_TABLE: List[Optional[Callable[[PickleVM], Any]]] = [_DISPATCH.get(i) for i in range(256)]

# Opcodes that look up Python objects outside the pickle: refused by name.
_REFUSED_OPCODES = {0x82: "EXT1 (copyreg extension registry)", 0x83: "EXT2 (copyreg extension registry)",
                    0x84: "EXT4 (copyreg extension registry)"}


def run_pickle(data, *, path=None, what="pickle", persistent_load=None, start=0, base_offset=0) -> Tuple[Any, int]:
    """Interpret one pickle starting at `start`; return (value, offset just after its STOP)."""
    vm = PickleVM(data, path=path, what=what, persistent_load=persistent_load, base_offset=base_offset)
    return vm.run(start)
