"""The two-stream SHA-256 kernel (sdtk._sha2 on SHA-NI): every digest equals hashlib's, for one
stream and for two interleaved ones, on random data of many lengths, offsets and update sizes;
the file hashes computed with it equal the hashlib path's."""
import hashlib
import os
import random

import numpy as np
import pytest

from sdtk.hashing import sha2pair

needs_kernel = pytest.mark.skipif(not sha2pair.available(), reason="sdtk._sha2 not built or this CPU has no SHA-NI")


@needs_kernel
@pytest.mark.parametrize("n", [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 64 * 4096 + 3, 64 * 4097, 1 << 20])
def test_one_stream_equals_hashlib(n):
    data = os.urandom(n)
    assert sha2pair.Sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    h = sha2pair.Sha256()
    for i in range(0, n, 37):  # updates that never fall on block boundaries
        h.update(data[i:i + 37])
    assert h.digest() == hashlib.sha256(data).digest()


@needs_kernel
def test_two_interleaved_streams_equal_hashlib_at_any_offset_and_split():
    rng = random.Random(10)
    for trial in range(300):
        n = rng.choice([rng.randint(0, 300), rng.randint(0, 5000), rng.randint(250_000, 300_000)])
        data = os.urandom(n)
        start = rng.choice([0, 8, rng.randint(0, n)]) if n else 0
        a, b = sha2pair.Sha256(), sha2pair.Sha256()
        i = 0
        while i < n:  # the way filehash feeds it: consecutive buffers, the second stream from `start`
            j = min(n, i + rng.choice([1, 63, 64, 65, rng.randint(1, 9000)]))
            sha2pair.update_pair(a, data[i:j], b, data[max(i, start):j] if j > start else b"")
            i = j
        assert a.hexdigest() == hashlib.sha256(data).hexdigest(), (trial, n)
        assert b.hexdigest() == hashlib.sha256(data[start:]).hexdigest(), (trial, n, start)


@needs_kernel
def test_kernel_checks_its_arguments():
    from sdtk import _sha2

    state = bytearray(32)
    with pytest.raises(ValueError):
        _sha2.compress(state, b"x" * 63)  # not whole blocks
    with pytest.raises(ValueError):
        _sha2.compress(bytearray(31), b"x" * 64)
    with pytest.raises(ValueError):
        _sha2.compress(state, b"x" * 64, state, b"y" * 64)  # one state twice
    with pytest.raises(BufferError):
        _sha2.compress(bytes(32), b"x" * 64)  # read-only state


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("SDTK_SHA2", "off")
    assert not sha2pair.available() and not sha2pair.worth_pairing()


@needs_kernel
def test_pairing_is_chosen_by_the_measured_gain(monkeypatch):
    monkeypatch.delenv("SDTK_SHA2", raising=False)
    gain = sha2pair.pair_gain()
    assert gain > 0.5
    assert sha2pair.worth_pairing() == (gain >= sha2pair.PAIR_WORTH_IT)
    monkeypatch.setattr(sha2pair, "_pair_gain", 1.6)
    assert sha2pair.worth_pairing()
    monkeypatch.setattr(sha2pair, "_pair_gain", 1.05)
    assert not sha2pair.worth_pairing()
    monkeypatch.setenv("SDTK_SHA2", "pair")
    assert sha2pair.worth_pairing()


@needs_kernel
@pytest.mark.parametrize("size", [5_000_000, 40 * 1024 * 1024 + 77])  # inline and threaded paths
def test_file_hashes_equal_the_hashlib_path(tmp_path, monkeypatch, size):
    from sdtk.hashing.filehash import FileHashes, hash_file

    path = tmp_path / "f.bin"
    rng = np.random.default_rng(size)
    head = (1234).to_bytes(8, "little")  # a safetensors-like length: AutoV3 starts at 8 + 1234
    path.write_bytes(head + rng.integers(0, 256, size - 8, dtype=np.uint8).tobytes())
    spans = [(8 + 1234, 1 << 20, "a"), (8 + 1234 + (1 << 20), size - 8 - 1234 - (1 << 20), "b")]
    monkeypatch.setenv("SDTK_SHA2", "off")
    ref = hash_file(path, tensor_spans=spans)
    monkeypatch.setenv("SDTK_SHA2", "pair")  # the interleaved kernel, whatever this CPU gains from it
    from sdtk.hashing.filehash import _Hashers

    assert _Hashers(size, None).pair  # this run goes through the kernel
    got = hash_file(path, tensor_spans=spans)
    data = path.read_bytes()
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.autov3 == hashlib.sha256(data[8 + 1234:]).hexdigest()
    assert got == ref and got.tensor_digests == ref.tensor_digests
    assert isinstance(got, FileHashes)
