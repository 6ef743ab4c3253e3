"""Large outputs written past the page cache (sdtk.directio): the same bytes as a plain write,
whatever the piece sizes, flushes, header rewrites and copied spans; a failing disk still gives
one line and leaves nothing; file systems that refuse O_DIRECT are written without it."""
import errno
import os

import numpy as np
import pytest

from sdtk import directio
from sdtk.directio import ALIGN, DirectWriter
from sdtk.errors import OutputError
from sdtk.formats import open_model
from sdtk.formats.safetensors import write_safetensors
from sdtk.tensors import FileSpan, LazyTensor, dtype, from_array

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")


def _pieces(seed=0, total=300_000):
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < total:
        k = int(rng.choice([1, 7, 100, ALIGN - 1, ALIGN, ALIGN + 3, 3 * ALIGN + 5, 40_000]))
        out.append(rng.integers(0, 256, k, dtype=np.uint8).tobytes())
        n += k
    return out


def _writer(path, **kw):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    return DirectWriter(fd, buffer_bytes=kw.pop("buffer_bytes", 2 * ALIGN), buffers=kw.pop("buffers", 2))


def test_pieces_flushes_patches_and_copies_give_the_same_bytes(tmp):
    src = tmp / "src.bin"
    src.write_bytes(np.random.default_rng(9).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    want = bytearray()
    w = _writer(tmp / "out.bin")
    for i, piece in enumerate(_pieces()):
        w.write(piece)
        want += piece
        if i % 17 == 0:
            w.flush()
            assert (tmp / "out.bin").read_bytes() == bytes(want)  # everything so far is in the file
        if i % 23 == 5:
            with open(src, "rb") as f:
                w.copy_from(f.fileno(), 123, 20_000)
            want += src.read_bytes()[123:20_123]
        assert w.tell() == len(want)
    for at, size in [(0, 10), (ALIGN - 3, 9), (len(want) - 5, 5), (len(want) - 2 * ALIGN - 1, 2 * ALIGN)]:
        patch = bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
        patch = (patch + b"\xee" * size)[:size]
        end = w.tell()
        w.seek(at)
        w.write(patch)
        w.seek(end)
        want[at:at + size] = patch
    w.write(b"tail")
    want += b"tail"
    w.close()
    assert (tmp / "out.bin").read_bytes() == bytes(want)


def test_a_refused_o_direct_falls_back_to_plain_writes(tmp, monkeypatch):
    real = os.pwrite
    calls = {"direct": 0}

    def refuse_direct(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls["direct"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(directio.os, "pwrite", refuse_direct)
    w = _writer(tmp / "out.bin")
    data = b"".join(_pieces(3, 60_000))
    w.write(data)
    w.close()
    assert calls["direct"] == 1 and not w.direct
    assert (tmp / "out.bin").read_bytes() == data


def _plan(tmp):
    rng = np.random.default_rng(1)
    sizes = list(rng.integers(1, 90_000, 24))
    sizes[3] = sizes[9] = 700_001  # over 1 MiB: copied file to file by the writer
    arrays = {f"t{i:02d}": rng.standard_normal(int(n)).astype(np.float16) for i, n in enumerate(sizes)}
    src = tmp / "src.safetensors"
    write_safetensors(src, [from_array(k, v) for k, v in arrays.items()])
    cat = open_model(src)
    plan = []
    for i, (k, t) in enumerate(cat.tensors.items()):
        if i % 3 == 0:  # copied file to file (a span the writer copies itself)
            plan.append(t)
        else:
            plan.append(LazyTensor(k, dtype("F16"), tuple(t.shape), (lambda t=t: t.read() * np.float16(0.5)), None))
    return cat, plan


def test_write_safetensors_direct_equals_buffered_with_a_rewritten_header(tmp, monkeypatch):
    monkeypatch.setattr(directio, "MIN_BYTES", 0)
    monkeypatch.setattr(directio, "BUFFER_BYTES", 4 * ALIGN)  # many buffers for a small file
    cat, plan = _plan(tmp)
    outs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("SDTK_DIRECT_IO", mode)
        outs[mode] = tmp / f"{mode}.safetensors"
        write_safetensors(outs[mode], plan, {"h": "0" * 64}, final_metadata=lambda: {"h": "f" * 64})
    cat.close()
    assert outs["on"].read_bytes() == outs["off"].read_bytes()
    with open_model(outs["on"]) as out:
        assert out.metadata["h"] == "f" * 64


def test_disk_full_in_the_writer_thread_is_one_line_and_leaves_nothing(tmp, monkeypatch):
    monkeypatch.setattr(directio, "MIN_BYTES", 0)
    monkeypatch.setattr(directio, "BUFFER_BYTES", 4 * ALIGN)
    monkeypatch.setenv("SDTK_DIRECT_IO", "on")
    real, count = os.pwrite, {"n": 0}

    def full(fd, data, offset):
        count["n"] += 1
        if count["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(directio.os, "pwrite", full)
    big = [from_array(f"x{i}", np.ones(20_000, np.float32)) for i in range(4)]
    with pytest.raises(OutputError, match="disk full"):
        write_safetensors(tmp / "out.safetensors", big)
    assert os.listdir(tmp) == []
