"""Fuzzing the pickle interpreter, the strict zip reader and the torch readers: truncations at
every length, bit flips, absurd length fields. Nothing may raise but our own SdtkError, nothing
may allocate much more than the file's size, and no file may take long."""
import os
import pickle
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_readers import TORCH_DATA
from sdtk.errors import SdtkError
from sdtk.formats import open_model
from sdtk.formats.picklevm import run_pickle
from sdtk.scan import scan_file

ZIP_FILE = (TORCH_DATA / "shared_views.pt").read_bytes()
LEGACY_FILE = (TORCH_DATA / "legacy.pt").read_bytes()
LIGHTNING_PKL = [d for n, d in __import__("helpers_readers").torch_zip_records(TORCH_DATA / "lightning.ckpt")
                 if n.endswith("data.pkl")][0]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _open_and_read(path):
    """open_model + read every tensor; returns normally or raises SdtkError only."""
    with open_model(path) as cat:
        for t in cat:
            t.read()


def _only_our_errors(fn, *args):
    try:
        fn(*args)
    except SdtkError:
        pass


@pytest.mark.parametrize("name,data", [("zip", ZIP_FILE), ("legacy", LEGACY_FILE)], ids=["zip", "legacy"])
def test_truncation_at_every_length(tmp, name, data):
    path = tmp / f"cut.{name}"
    path.write_bytes(data)
    for cut in reversed(range(len(data))):
        os.truncate(path, cut)  # cheaper than rewriting the file each time
        _only_our_errors(_open_and_read, path)
        if cut % 3 == 0:
            assert scan_file(path).verdict == "unreadable", cut


def test_pickle_truncation_at_every_length():
    for cut in range(len(LIGHTNING_PKL)):
        def run(data=LIGHTNING_PKL[:cut]):
            run_pickle(data, persistent_load=lambda pid: None)
        _only_our_errors(run)


@FUZZ
@given(data=st.data())
def test_bit_flips_in_checkpoints(tmp, data):
    source = data.draw(st.sampled_from([ZIP_FILE, LEGACY_FILE]))
    raw = bytearray(source)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp / "flipped.pt"
    path.write_bytes(bytes(raw))
    _only_our_errors(_open_and_read, path)
    assert scan_file(path).verdict in ("safe", "unsafe", "unreadable")


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_pickle(data):
    _only_our_errors(run_pickle, data)


@FUZZ
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                          lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
                          max_leaves=30),
       proto=st.integers(0, 5), cut=st.integers(0, 400), flip=st.integers(0, 4000))
def test_mutated_real_pickles(value, proto, cut, flip):
    data = bytearray(pickle.dumps(value, protocol=proto))
    assert run_pickle(bytes(data))[0] == value
    if flip < len(data) * 8:
        data[flip // 8] ^= 1 << (flip % 8)
    _only_our_errors(run_pickle, bytes(data[:cut] if cut < len(data) else data))


ABSURD = [2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]


@pytest.mark.parametrize("opcode,fmt", [(b"X", "<I"), (b"B", "<I"), (b"T", "<i"), (b"\x8d", "<Q"), (b"\x8e", "<Q"),
                                        (b"\x96", "<Q"), (b"\x95", "<Q"), (b"\x8b", "<i")])
def test_absurd_length_fields_allocate_nothing(opcode, fmt):
    for n in ABSURD:
        try:
            field = struct.pack(fmt, n)
        except struct.error:
            field = struct.pack(fmt, 2**31 - 1)
        data = b"\x80\x04" + opcode + field + b"abc."
        tracemalloc.start()
        try:
            run_pickle(data)
        except SdtkError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 1 << 20, (opcode, n, peak)


def test_absurd_zip_sizes_allocate_nothing(tmp):
    """Central-directory sizes and counts patched to absurd values."""
    raw = ZIP_FILE
    eocd = raw.rindex(b"PK\x05\x06")
    cd = raw.index(b"PK\x01\x02")
    patches = [(cd + 20, "<I", 0xFFFFFFF0), (cd + 24, "<I", 0xFFFFFFF0), (cd + 28, "<H", 0xFFFF),
               (eocd + 10, "<H", 0xFFFF), (eocd + 12, "<I", 0xFFFFFFF0), (eocd + 16, "<I", 0xFFFFFFF0)]
    z64 = raw.rfind(b"PK\x06\x06")
    if z64 >= 0:
        patches += [(z64 + 32, "<Q", 2**62), (z64 + 40, "<Q", 2**62), (z64 + 48, "<Q", 2**62)]
    for pos, fmt, value in patches:
        data = bytearray(raw)
        struct.pack_into(fmt, data, pos, value)
        path = tmp / "absurd.pt"
        path.write_bytes(bytes(data))
        tracemalloc.start()
        try:
            _only_our_errors(_open_and_read, path)
            scan_file(path)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 16 * len(raw) + (4 << 20), (pos, peak)
