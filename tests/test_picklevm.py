"""Our own pickle interpreter: exact on plain data, inert on everything else, bounded on bombs."""
import math
import pickle
import time

import numpy as np
import pytest

from helpers_readers import Asm
from sdtk.errors import FormatError, SdtkError, UnsafeFileError
from sdtk.formats.checkpoint_tree import flatten_checkpoint
from sdtk.formats.picklevm import ALLOWLIST, ODict, run_pickle

PLAIN_VALUES = [
    None, True, False, 0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31 - 1, 2**31, 2**63, -(2**70), 10**30,
    0.5, -1e300, float("inf"), "", "a", "é ∑ 漢字 \U0001F600", "x" * 300, b"", b"\x00\xff" * 200,
    (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [], [1, [2, [3]]], {}, {"a": 1, 2: "b", (1, 2): [3]},
    {1, 2, 3}, frozenset({4, 5}), bytearray(b"abc"),
    {"global_step": 470000, "epoch": 6, "lr": 1e-4, "betas": (0.9, 0.999), "nested": {"deep": [1, 2, {"x": None}]}},
]


@pytest.mark.parametrize("proto", range(0, 6))
def test_plain_values_decode_exactly_like_cpython(proto):
    for value in PLAIN_VALUES:
        if (isinstance(value, bytes) and proto < 3) or (isinstance(value, bytearray) and proto < 5):
            continue  # pickled as calls of builtins.bytes/bytearray, which tensor files never contain
        data = pickle.dumps(value, protocol=proto)
        ours, end = run_pickle(data)
        assert end == len(data)
        assert ours == pickle.loads(data) and type(ours) is type(pickle.loads(data)), (proto, value)


def test_shared_references_are_shared_like_cpython():
    inner = [1, 2]
    data = pickle.dumps({"a": inner, "b": inner}, protocol=2)
    ours, _ = run_pickle(data)
    assert ours["a"] is ours["b"]


def test_ordered_dict_with_torch_metadata_attribute():
    from collections import OrderedDict

    sd = OrderedDict([("w", 1), ("b", 2)])
    sd._metadata = OrderedDict([("", {"version": 1})])  # torch state dicts carry this attribute
    ours, _ = run_pickle(pickle.dumps(sd, protocol=2))
    assert isinstance(ours, ODict) and list(ours.items()) == [("w", 1), ("b", 2)]
    assert ours.attributes["_metadata"] == {"": {"version": 1}}


@pytest.mark.parametrize("spelling,proto", [("numpy._core.multiarray", 2), ("numpy._core.multiarray", 3),
                                            ("numpy._core.multiarray", 4), ("numpy.core.multiarray", 2),
                                            ("numpy.core.multiarray", 3)])
def test_numpy_scalars_and_arrays_become_plain_values(spelling, proto):
    value = {"f": np.float64(0.25), "i": np.int64(-7), "b": np.bool_(True), "h": np.float16(1.5),
             "a": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "fo": np.asfortranarray(np.arange(6).reshape(2, 3))}
    data = pickle.dumps(value, protocol=proto)
    if spelling == "numpy.core.multiarray":  # numpy 1 spelling (real SD checkpoints)
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # GLOBAL lines: no length prefix
    ours, _ = run_pickle(data)
    assert ours["f"] == 0.25 and type(ours["f"]) is float
    assert ours["i"] == -7 and ours["b"] is True and ours["h"] == 1.5
    tree = flatten_checkpoint(ours, "x", 10_000)[1]
    assert tree["a"] == [[1.0, 2.0], [3.0, 4.0]]
    assert tree["fo"] == [[0, 1, 2], [3, 4, 5]]


def test_numpy_object_arrays_are_refused():
    data = pickle.dumps(np.array([1, "x"], dtype=object), protocol=2)
    with pytest.raises(FormatError, match="object arrays"):
        run_pickle(data)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("builtins", "exec"),
                                         ("torch._utils", "_rebuild_tensor"), ("torch._tensor", "_rebuild_from_type_v2"),
                                         ("torch.storage", "_load_from_bytes"), ("torch._inductor.codecache", "compile_file"),
                                         ("numpy", "load"), ("collections", "defaultdict"), ("__builtin__", "getattr")])
def test_globals_outside_the_allowlist_are_refused_by_name(module, name):
    data = Asm().proto(2).global_(module, name).stop().bytes()
    with pytest.raises(UnsafeFileError, match=f"{module}.{name}"):
        run_pickle(data)


def test_dotted_names_are_refused_even_under_allowed_modules():
    data = Asm().proto(4).stack_global("collections", "OrderedDict.__init__").stop().bytes()
    with pytest.raises(UnsafeFileError, match="dotted"):
        run_pickle(data)


def test_python2_builtin_spelling_only_at_protocol_below_3():
    ok = Asm().proto(2).global_("__builtin__", "set").raw(b"]").tuple1().reduce().stop().bytes()
    assert run_pickle(ok)[0] == set()
    late = Asm().proto(3).global_("__builtin__", "set").raw(b"]").tuple1().reduce().stop().bytes()
    with pytest.raises(UnsafeFileError):
        run_pickle(late)


def test_allowlisted_class_used_as_value_but_never_called():
    key = Asm().proto(2).empty_dict().global_("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint").int_(1).setitem().stop().bytes()
    value, _ = run_pickle(key)
    assert [str(k) for k in value] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    call = Asm().proto(2).global_("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint").empty_tuple().reduce().stop().bytes()
    with pytest.raises(UnsafeFileError, match="calls"):
        run_pickle(call)


def test_ext_opcodes_are_refused():
    with pytest.raises(UnsafeFileError, match="EXT1"):
        run_pickle(b"\x80\x02\x82\x01.")


def test_persistent_ids_need_a_loader():
    data = Asm().proto(2).mark().unicode("storage").tuple_().binpersid().stop().bytes()
    with pytest.raises(FormatError, match="persistent id"):
        run_pickle(data)


def test_frame_is_transparent_like_the_c_unpickler():
    # A frame boundary inside an opcode: CPython's C unpickler reads straight through.
    body = Asm().global_("os", "system").stop().bytes()
    data = Asm().proto(4).frame(3).raw(body).bytes()
    with pytest.raises(UnsafeFileError, match="os.system"):
        run_pickle(data)
    with pytest.raises(FormatError, match="FRAME"):
        run_pickle(Asm().proto(4).frame(1000).raw(b"N.").bytes())


def test_stop_returns_top_of_stack_like_cpython():
    data = b"K\x01K\x02."  # two values on the stack; CPython returns the top one
    assert run_pickle(data)[0] == pickle.loads(data) == 2


@pytest.mark.parametrize("data,problem", [
    (b"", "truncated"), (b"\x80\x02", "truncated"), (b"\x80\x09N.", "protocol"), (b"0.", "underflow"),
    (b"(R.", "underflow"), (b"h\x05.", "memo"), (b"\xff", "opcode"), (b"X\xff\xff\xff\xff", "truncated"),
    (b"S'abc\n.", "quoted"), (b"Iabc\n.", "INT"), (b"\x8b\xff\xff\xff\x7f", "absurd"), (b"(K\x01d.", "odd"),
    (b"]]s.", "underflow"), (b"K\x01K\x02a.", "not a list"),
])
def test_malformed_pickles_raise_our_error(data, problem):
    with pytest.raises(FormatError, match=problem):
        run_pickle(data)


def test_reference_bomb_fails_fast():
    # Each level is a list holding the previous level 10 times: 10**40 leaves if walked naively.
    asm = Asm().proto(2).raw(b"K\x00").raw(b"q\x00")
    for level in range(40):
        asm.mark()
        for _ in range(10):
            asm.raw(b"h" + bytes([level]))
        asm.raw(b"l").raw(b"q" + bytes([level + 1]))
    data = asm.raw(b"}").raw(b"X\x01\x00\x00\x00k").raw(b"h" + bytes([40])).raw(b"s").stop().bytes()
    value, _ = run_pickle(data)
    start = time.perf_counter()
    with pytest.raises(FormatError):
        flatten_checkpoint(value, "bomb.pkl", budget=4 * len(data) + 10_000)
    assert time.perf_counter() - start < 2


def test_copy_bomb_is_bounded():
    # set(big list) called again and again on the same memoised list
    asm = Asm().proto(2).mark()
    for _ in range(2000):
        asm.raw(b"K\x01")
    asm.raw(b"l").raw(b"q\x00").mark()
    for _ in range(5000):
        asm.global_("builtins", "set").raw(b"h\x00").tuple1().reduce()
    data = asm.raw(b"l").stop().bytes()
    with pytest.raises(FormatError, match="bomb"):
        run_pickle(data)


def test_self_containing_structure_is_refused_when_flattened():
    data = b"\x80\x02]q\x00h\x00a."  # a list that contains itself
    value, _ = run_pickle(data)
    with pytest.raises(FormatError, match="contains itself"):
        flatten_checkpoint({"x": value}, "loop.pkl", 10_000)


def test_deep_nesting_is_refused_cleanly():
    data = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."
    value, _ = run_pickle(data)
    with pytest.raises(FormatError, match="nested"):
        flatten_checkpoint({"x": value}, "deep.pkl", 100_000)
    deep_key = b"\x80\x02}" + b"N" + b"\x85" * 50 + b"N" + b"s."
    with pytest.raises(FormatError, match="key"):
        run_pickle(deep_key)


def test_allowlist_rows_are_exact_names_without_dots():
    for module, name in ALLOWLIST:
        assert "." not in name and name and module
    assert ("torch", "load") not in ALLOWLIST and ("builtins", "getattr") not in ALLOWLIST


def test_errors_are_always_ours():
    # A few pathological but syntactically complete pickles: only SdtkError may escape.
    for data in [b"F1e999999\n.", b"L" + b"9" * 5000 + b"L\n.", b"I0x\n.", b"V\\u12\n.", b"\x8a\x08" + b"\xff" * 8 + b".",
                 b"\x80\x02c\xff\n\xff\n.", b"\x8d" + b"\xff" * 8, b"\x95" + b"\xff" * 8]:
        try:
            run_pickle(data)
        except SdtkError:
            pass
    assert math.isinf(run_pickle(b"F1e999\n.")[0])
