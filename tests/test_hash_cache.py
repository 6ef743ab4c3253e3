"""The persistent hash cache used for lineage: hashed once, re-hashed whenever the file changes."""
import os

import numpy as np

from sdtk.formats.safetensors import write_safetensors
from sdtk.hashing import cache as hash_cache
from sdtk.ops import lineage
from sdtk.tensors import from_array


def _model(path, value):
    write_safetensors(path, [from_array("w", np.full(8, value, np.float32))], overwrite=True)


def test_lineage_hashes_come_from_the_cache_until_the_file_changes(tmp, monkeypatch):
    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp / "cache.sqlite3"))
    path = tmp / "m.safetensors"
    _model(path, 1.0)
    first = lineage.source_hashes(str(path))
    assert hash_cache.cached_hashes(path) == first

    calls = []
    import sdtk.hashing as hashing

    original = hashing.hash_file

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(hashing, "hash_file", counting)
    assert lineage.source_hashes(str(path)) == first
    assert calls == []  # unchanged file: not read again

    _model(path, 2.0)  # same size, new content and mtime
    os.utime(path, ns=(1, 1))
    second = lineage.source_hashes(str(path))
    assert calls == [1] and second["sha256"] != first["sha256"]
    assert hash_cache.cached_hashes(path) == second


def test_cache_off_or_unwritable_just_computes(tmp, monkeypatch):
    path = tmp / "m.safetensors"
    _model(path, 3.0)
    monkeypatch.setenv("SDTK_HASH_CACHE", "off")
    assert hash_cache.cached_hashes(path) == {}
    a = lineage.source_hashes(str(path))
    (tmp / "a-file").write_text("not a folder")
    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp / "a-file" / "hashes.sqlite3"))
    assert lineage.source_hashes(str(path)) == a
