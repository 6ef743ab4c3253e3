"""The strict safetensors reader and the streaming writer, against the `safetensors` library."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from sdtk import open_model
from sdtk.errors import FormatError, OutputError
from sdtk.formats.safetensors import write_safetensors
from sdtk.tensors import DTYPES, from_array


def _sample_arrays():
    rng = np.random.default_rng(1)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "f8a": rng.standard_normal((6,)).astype(ml_dtypes.float8_e4m3fn),
        "f8b": rng.standard_normal((6,)).astype(ml_dtypes.float8_e5m2),
        "i64": np.arange(77, dtype=np.int64)[None],
        "i32": np.array([7], dtype=np.int32),
        "u8": np.arange(10, dtype=np.uint8),
        "b": np.array([True, False]),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(1.5, dtype=np.float64),
    }


def test_our_output_reads_in_safetensors_library(tmp):
    arrays = _sample_arrays()
    path = tmp / "out.safetensors"
    write_safetensors(path, [from_array(k, v) for k, v in arrays.items()], {"modelspec.title": "x", "ünï": "códe"})
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"modelspec.title": "x", "ünï": "códe"}
        for k, v in arrays.items():
            if k.startswith("f8"):
                continue  # numpy framework of safetensors cannot return fp8; checked below through our reader
            got = f.get_tensor(k)
            assert got.shape == v.shape and got.tobytes() == v.tobytes(), k
    # data starts 8-byte aligned
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0
    with open_model(path) as cat:
        for k, v in arrays.items():
            assert cat[k].read().tobytes() == v.tobytes()
            assert cat[k].shape == v.shape


def test_library_output_reads_in_ours(tmp):
    arrays = {k: v for k, v in _sample_arrays().items() if not k.startswith("f8") and k != "bf16"}
    path = tmp / "lib.safetensors"
    save_file(arrays, str(path), metadata={"a": "b"})
    with open_model(path) as cat:
        assert cat.format == "safetensors"
        assert cat.metadata == {"a": "b"}
        assert set(cat.tensors) == set(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(cat[k].read(), v)
            assert cat[k].read().dtype == v.dtype


def test_content_not_extension_decides(tmp):
    path = tmp / "model.ckpt"
    save_file({"x": np.ones(3, np.float32)}, str(path))
    with open_model(path) as cat:
        assert cat.format == "safetensors"


def _raw_file(tmp, header: bytes, data: bytes = b"", name="bad.safetensors"):
    p = tmp / name
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return p


@pytest.mark.parametrize(
    "header,data,problem",
    [
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "duplicate key"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}', b"\0" * 4, "unknown field"),
        (b' {"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "whitespace"),
        (b'{"a\\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "NUL"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4, "needs 8 bytes"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}', b"\0" * 8, "overlaps"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "gap"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 9, "after the last tensor"),
        (b'{"a":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}', b"", "truncated"),
        (b'{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "unsupported dtype"),
        (b'{"__metadata__":{"a":1}}', b"", "strings"),
        (b'[1,2]', b"", "JSON object"),
        (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4, "non-negative"),
    ],
)
def test_strict_reader_refuses(tmp, header, data, problem):
    p = _raw_file(tmp, header, data)
    with pytest.raises(FormatError) as e:
        open_model(p)
    assert problem in str(e.value) and str(p) in str(e.value)


def test_header_longer_than_file(tmp):
    p = tmp / "short.safetensors"
    p.write_bytes(struct.pack("<Q", 5000) + b'{"a":1}')
    with pytest.raises(FormatError, match="claims 5000 bytes"):
        open_model(p)


def test_truncated_and_empty(tmp):
    arrays = {"x": np.arange(100, dtype=np.float32)}
    good = tmp / "good.safetensors"
    save_file(arrays, str(good))
    raw = good.read_bytes()
    for cut in range(len(raw)):
        p = tmp / "cut.safetensors"
        p.write_bytes(raw[:cut])
        with pytest.raises(Exception) as e:
            open_model(p)
        assert isinstance(e.value, (FormatError,)) or e.value.__class__.__name__.endswith("Error")
        assert "Traceback" not in str(e.value)


def test_writer_refuses_overwrite_and_input(tmp):
    src = tmp / "a.safetensors"
    write_safetensors(src, [from_array("x", np.ones(2, np.float32))])
    before = src.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        write_safetensors(src, [from_array("x", np.zeros(2, np.float32))])
    with pytest.raises(OutputError, match="one of the inputs"):
        write_safetensors(src, [from_array("x", np.zeros(2, np.float32))], inputs=[src], overwrite=True)
    assert src.read_bytes() == before
    write_safetensors(src, [from_array("x", np.zeros(2, np.float32))], overwrite=True)
    assert src.read_bytes() != before


def test_failure_mid_write_leaves_nothing(tmp):
    def boom():
        raise RuntimeError("tensor failed")

    from sdtk.tensors import LazyTensor

    plan = [from_array("a", np.ones(4, np.float32)), LazyTensor("b", DTYPES["F32"], (4,), boom)]
    dest = tmp / "out.safetensors"
    with pytest.raises(RuntimeError):
        write_safetensors(dest, plan)
    assert os.listdir(tmp) == []


def test_disk_full_is_one_line_and_leaves_nothing(tmp, monkeypatch):
    import errno

    dest = tmp / "out.safetensors"
    real_write = None

    class Full:
        def __init__(self):
            self.calls = 0

    from sdtk import fileio

    orig_fdopen = os.fdopen

    class FullFile:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FullFile(orig_fdopen(fd, mode)))
    with pytest.raises(OutputError, match="disk full"):
        write_safetensors(dest, [from_array("a", np.ones(4, np.float32))])
    assert os.listdir(tmp) == []


def test_cli_convert_and_errors(tmp, cli):
    src = tmp / "in.safetensors"
    write_safetensors(src, [from_array("x", np.arange(4, dtype=np.float32))], {"k": "v"})
    r = cli("convert", src, tmp / "out.safetensors")
    assert r.returncode == 0, r.stderr
    with open_model(tmp / "out.safetensors") as cat:
        assert cat.metadata["k"] == "v" and cat["x"].read().tolist() == [0, 1, 2, 3]
    r = cli("convert", tmp / "missing.ckpt", tmp / "o2.safetensors")
    assert r.returncode == 2 and "missing.ckpt: no such file" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_copied_spans_are_verified_before_commit(tmp):
    """A file-to-file copy skips read(); the writer must still run the source's integrity check."""
    from dataclasses import replace

    from sdtk.errors import FormatError

    src = tmp / "big.safetensors"
    big = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: copied file to file
    write_safetensors(src, [from_array("w", big)])
    calls = []

    def corrupt():
        calls.append(1)
        raise FormatError(src, "CRC mismatch in zip record 'archive/data/0'")

    with open_model(src) as cat:
        plan = [replace(cat["w"], verify=corrupt)]
        with pytest.raises(FormatError, match="CRC mismatch"):
            write_safetensors(tmp / "out.safetensors", plan)
        assert calls == [1]
        assert not (tmp / "out.safetensors").exists()
        assert sorted(os.listdir(tmp)) == ["big.safetensors"]
        plan = [replace(cat["w"], verify=lambda: None)]
        write_safetensors(tmp / "ok.safetensors", plan)
    with open_model(tmp / "ok.safetensors") as out:
        assert out["w"].read().tobytes() == big.tobytes()
