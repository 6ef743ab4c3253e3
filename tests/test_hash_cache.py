"""The persistent hash cache shared by lineage, `sdtk hash`, the library and merge: a file is
hashed once, and again whenever it changes."""
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
    cached = hash_cache.cached_hashes(path)
    assert {k: cached[k] for k in first} == first
    assert hash_cache.cached_file_hashes(path) is not None  # all six file hashes came along

    calls = []
    import sdtk.hashing.model as hashing

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
    cached = hash_cache.cached_hashes(path)
    assert {k: cached[k] for k in second} == second


def test_cache_off_or_unwritable_just_computes(tmp, monkeypatch):
    path = tmp / "m.safetensors"
    _model(path, 3.0)
    monkeypatch.setenv("SDTK_HASH_CACHE", "off")
    assert hash_cache.cached_hashes(path) == {}
    a = lineage.source_hashes(str(path))
    (tmp / "a-file").write_text("not a folder")
    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp / "a-file" / "hashes.sqlite3"))
    assert lineage.source_hashes(str(path)) == a


def _count_reads(monkeypatch):
    import sdtk.hashing.model as model

    calls = []
    original = model.hash_file

    def counting(*a, **k):
        calls.append(a[0])
        return original(*a, **k)

    monkeypatch.setattr(model, "hash_file", counting)
    return calls


def test_one_cache_for_hash_library_convert_lineage_and_merge(tmp, monkeypatch):
    from sdtk.cli.hash import hash_one
    from sdtk.hashing import hash_file
    from sdtk.library import db as library_db
    from sdtk.library.scan import scan_library
    from sdtk.ops.merge.run import _Hasher

    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp / "cache.sqlite3"))
    folder = tmp / "models"
    folder.mkdir()
    path = folder / "m.safetensors"
    _model(path, 4.0)
    truth = hash_file(path)
    calls = _count_reads(monkeypatch)

    # lineage (convert) reads the file once and leaves all six hashes and the content hash
    lineage.source_hashes(str(path))
    assert len(calls) == 1
    # `sdtk hash --content` then prints them without reading the file ...
    row, problem = hash_one(path, "a1111", content=True, show_progress=False)
    assert problem is None and len(calls) == 1
    assert row["SHA256"] == truth.sha256 and row["BLAKE3"] == truth.blake3 and row["Content"]
    # ... unless asked to read it again
    again, _ = hash_one(path, "a1111", content=True, show_progress=False, use_cache=False)
    assert len(calls) == 2 and again == row
    # the library indexes it without hashing, with the same values
    conn = library_db.connect(str(tmp / "lib.sqlite3"))
    report = scan_library(conn, [str(folder)])
    assert (report.hashed, report.hashes_from_cache) == (0, 1) and len(calls) == 2
    stored = conn.execute("SELECT sha256, blake3, content_hash FROM files").fetchone()
    assert tuple(stored) == (truth.sha256, truth.blake3, row["Content"])
    # merge's input hash comes from the cache too
    hasher = _Hasher([str(path)])
    hasher.run()
    assert hasher.results[str(path)] == truth.sha256 and len(calls) == 2


def test_library_fills_the_cache_for_hash(tmp, monkeypatch):
    from sdtk.cli.hash import hash_one
    from sdtk.library import db as library_db
    from sdtk.library.scan import scan_library

    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp / "cache.sqlite3"))
    folder = tmp / "models"
    folder.mkdir()
    _model(folder / "m.safetensors", 5.0)
    calls = _count_reads(monkeypatch)
    report = scan_library(library_db.connect(str(tmp / "lib.sqlite3")), [str(folder)])
    assert report.hashed == 1 and len(calls) == 1
    row, _ = hash_one(folder / "m.safetensors", "civitai", content=True, show_progress=False)
    assert len(calls) == 1 and row["Content"]
