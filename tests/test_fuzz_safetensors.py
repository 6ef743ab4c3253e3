"""Fuzzing the safetensors reader: whatever the bytes, it either reads the file or raises one of
our own errors (SdtkError) with a message, never another exception, and never allocates more
than the file's size (a hostile length field must not make it read or allocate gigabytes).

Every input is a variation of a small valid file built from a real layout; the tensors of every
file that is accepted are materialised too (read() must work on whatever the header promised)."""
import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdtk.errors import FormatError, SdtkError
from sdtk.formats import open_model
from sdtk.formats.safetensors import read_safetensors, write_safetensors
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import DTYPES, from_array

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALLOWANCE = 256 << 10  # the interpreter's own small allocations (JSON objects, strings)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    """Real CLIP-L tensor names and dtypes (incl. int64 position_ids), scaled down, plus one
    tensor of each other dtype, with metadata: ~4 KB."""
    layout = load_layout("clip-l-hf")
    plan = [t for t in layout_plan(layout, values="random", scale=96)[:14] if t.nbytes <= 1024]
    plan += [from_array(f"extra.{d.lower()}", np.arange(6).astype(DTYPES[d].numpy).reshape(2, 3))
             for d in ("BF16", "F8_E4M3", "F8_E5M2", "U16", "BOOL", "F64")]
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    write_safetensors(path, plan, {"format": "pt", "modelspec.title": "fuzz"})
    return path.read_bytes()


def read_all(path, size, check_memory=True):
    """Open `path` as a model file and materialise every tensor; returns the catalogue's names.
    Asserts the reader allocated no more than the file's size (plus a small allowance)."""
    if check_memory:
        tracemalloc.start()
    try:
        with open_model(path) as cat:
            names = list(cat.tensors)
            touched = 0
            for t in cat.tensors.values():
                arr = t.read()
                assert arr.shape == t.shape and arr.dtype == t.dtype.numpy
                touched += arr.nbytes
            assert touched <= size
        _, peak = tracemalloc.get_traced_memory() if check_memory else (0, 0)
    finally:
        tracemalloc.stop()
    assert peak <= size + ALLOWANCE, f"reader allocated {peak} bytes for a {size}-byte file"
    return names


def outcome(path, data: bytes, check_memory=True):
    """'ok' or the SdtkError; any other exception fails the test. (A fresh file each time:
    rewriting one file in place makes ext4 flush it to disk on every close.)"""
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    try:
        read_all(path, len(data), check_memory)
        return "ok"
    except SdtkError as e:
        assert str(e).startswith(str(path)), f"message does not name the file: {e}"
        assert "\n" not in str(e)
        return e


def test_valid_file_reads(valid_file, tmp):
    assert outcome(tmp / "f.safetensors", valid_file) == "ok"


def test_truncation_at_every_length_is_refused(valid_file, tmp):
    """Every length (memory is checked by the hypothesis tests below; here it would only
    multiply the runtime)."""
    path = tmp / "t.safetensors"
    for n in range(len(valid_file)):
        got = outcome(path, valid_file[:n], check_memory=False)
        assert isinstance(got, FormatError), f"truncated to {n} bytes: {got!r}"


def test_appended_bytes_are_refused(valid_file, tmp):
    got = outcome(tmp / "a.safetensors", valid_file + b"\0")
    assert isinstance(got, FormatError) and "after the last tensor" in got.problem


@FUZZ
@given(data=st.data())
def test_bit_flips_in_length_and_header(valid_file, tmp, data):
    (n,) = struct.unpack("<Q", valid_file[:8])
    buf = bytearray(valid_file)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, 8 + n - 1))
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    outcome(tmp / "b.safetensors", bytes(buf))


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 7, 8, 2**31, 2**32, 2**63, 2**64 - 1, 100_000_001])))
def test_absurd_length_fields(valid_file, tmp, length):
    got = outcome(tmp / "l.safetensors", struct.pack("<Q", length) + valid_file[8:])
    (real,) = struct.unpack("<Q", valid_file[:8])
    if length != real:
        assert isinstance(got, SdtkError)


HUGE = st.sampled_from([2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100])
DIM = st.one_of(st.integers(0, 9), HUGE, st.integers(-3, -1))
OFFSET = st.one_of(st.integers(0, 300), HUGE, st.integers(-5, -1))
JUNK = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5), st.lists(st.integers(), max_size=3))
PLAIN_NAME = st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True)


def mostly(good, bad):
    """`good` three times out of four: hostile values, but enough valid ones to get past the
    first check (a header refused at its first entry tests little)."""
    return st.sampled_from([good, good, good, bad]).flatmap(lambda strategy: strategy)


entry_fields = {
    "dtype": mostly(st.sampled_from(sorted(DTYPES)), st.one_of(st.sampled_from(["f32", "F4", "", "float32"]), JUNK)),
    "shape": mostly(st.lists(st.integers(0, 9), max_size=4), st.one_of(st.lists(DIM, max_size=4), JUNK)),
    "data_offsets": mostly(st.lists(OFFSET, min_size=2, max_size=2), st.one_of(st.lists(OFFSET, max_size=3), JUNK)),
}
entry = mostly(st.fixed_dictionaries(entry_fields),
               st.one_of(st.fixed_dictionaries(entry_fields, optional={"extra": JUNK}), JUNK))
metadata = mostly(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
                  st.one_of(JUNK, st.dictionaries(st.text(max_size=4), JUNK, max_size=2)))


@st.composite
def header(draw):
    names = draw(st.lists(mostly(PLAIN_NAME, st.sampled_from(["", "a\x00b", "x" * 300])), max_size=6))
    hdr = {name: draw(entry) for name in names}
    if draw(st.booleans()):
        hdr["__metadata__"] = draw(metadata)
    return hdr


@FUZZ
@given(hdr=header(), data_size=st.integers(0, 300), pad=st.sampled_from(["", " ", "  \n"]))
def test_random_json_headers(tmp, hdr, data_size, pad):
    raw = json.dumps(hdr).encode() + pad.encode()
    outcome(tmp / "j.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(range(256))[:data_size % 256] * (1 + data_size // 256))


@FUZZ
@given(hdr=header())
def test_random_headers_with_consistent_offsets(tmp, hdr):
    """Headers whose offsets tile the buffer exactly, so only dtype/shape checks can refuse them;
    accepted files must materialise within the file's size."""
    cursor, fixed = 0, {}
    for name, e in hdr.items():
        if isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in DTYPES and isinstance(e.get("shape"), list) \
                and all(type(d) is int and 0 <= d < 10 for d in e["shape"]):
            n = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            e = dict(e, data_offsets=[cursor, cursor + n])
            cursor += n
        fixed[name] = e
    raw = json.dumps(fixed).encode()
    outcome(tmp / "c.safetensors", struct.pack("<Q", len(raw)) + raw + b"\x3c" * cursor)


def test_header_claiming_more_than_the_file_is_refused_without_reading_it(valid_file, tmp):
    path = tmp / "big.safetensors"
    got = outcome(path, struct.pack("<Q", 99_000_000) + valid_file[8:])
    assert isinstance(got, FormatError) and "truncated" in got.problem


def test_tensor_claiming_100_gb_is_refused(tmp):
    raw = json.dumps({"w": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}}).encode()
    got = outcome(tmp / "h.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(64))
    assert isinstance(got, FormatError) and "truncated" in got.problem


def test_read_safetensors_directly_on_non_safetensors_bytes(tmp):
    """The strict reader is also safe when called on a file the sniffer would not send to it."""
    for blob in (b"", b"PK\x03\x04" + bytes(40), b"\x80\x02}q\x00.", b"{}", b"\xff" * 8 + b"{}"):
        path = tmp / "x.bin"
        path.write_bytes(blob)
        with pytest.raises(SdtkError):
            read_safetensors(path)
