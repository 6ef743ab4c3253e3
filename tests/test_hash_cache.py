"""The persistent hash cache shared by lineage, `sdtk hash`, the library and merge: a file is
hashed once, and again whenever it changes."""
import os

import numpy as np
import pytest

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
    # only what lineage records is computed (two sha256 streams + BLAKE3): `sdtk hash` adds the rest
    assert hash_cache.cached_file_hashes(path) is None and "blake3" not in cached and "crc32" not in cached

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

    # lineage (convert) reads the file once, for only what it records (SHA256, AutoV3, content v2)
    lineage.source_hashes(str(path))
    assert len(calls) == 1
    # `sdtk hash --content` reads it once for the rest (BLAKE3, CRC32, content v1), agreeing with lineage ...
    row, problem = hash_one(path, "a1111", content=True, show_progress=False)
    assert problem is None and len(calls) == 2
    assert row["SHA256"] == truth.sha256 and row["BLAKE3"] == truth.blake3 and row["Content"]
    assert row["ContentV2"] == lineage.source_hashes(str(path))["content_v2"] and len(calls) == 2
    # ... then prints them without reading the file, unless asked to read it again
    assert hash_one(path, "a1111", content=True, show_progress=False)[0] == row and len(calls) == 2
    again, _ = hash_one(path, "a1111", content=True, show_progress=False, use_cache=False)
    assert len(calls) == 3 and again == row
    # the library indexes it without hashing, with the same values
    conn = library_db.connect(str(tmp / "lib.sqlite3"))
    report = scan_library(conn, [str(folder)])
    assert (report.hashed, report.hashes_from_cache) == (0, 1) and len(calls) == 3
    stored = conn.execute("SELECT sha256, blake3, content_hash FROM files").fetchone()
    assert tuple(stored) == (truth.sha256, truth.blake3, row["Content"])
    # merge's input hashes come from the cache too
    hasher = _Hasher([str(path)])
    hasher.run()
    assert hasher.results[str(path)]["sha256"] == truth.sha256 and len(calls) == 3


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


@pytest.mark.parametrize("sha2", ["pair", "off"])
def test_lineage_hashes_equal_sdtk_hash_of_the_same_file(tmp, monkeypatch, sha2):
    """What convert/merge record (source_sha256, source_autov3, source_content_v2) is byte for byte
    what `sdtk hash --content --style a1111 --json` prints for the input, computed either way first,
    with the two-stream SHA-NI kernel or hashlib (the fresh `sdtk hash` always with hashlib)."""
    import json

    from conftest import run_cli

    monkeypatch.setenv("SDTK_SHA2", sha2)
    for order in ("lineage first", "hash first"):
        cache = tmp / f"{order}.sqlite3"
        monkeypatch.setenv("SDTK_HASH_CACHE", str(cache))
        path = tmp / f"{order.split()[0]}.safetensors"
        write_safetensors(path, [from_array("a", np.arange(3_000_000, dtype=np.float32)),
                                 from_array("b", np.full(5, 2, np.int64))], overwrite=True)
        if order == "lineage first":
            recorded = lineage.source_hashes(str(path))
        r = run_cli("hash", "--content", "--style", "a1111", "--json", path, env={"SDTK_HASH_CACHE": str(cache)})
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)[0]
        if order == "hash first":
            recorded = lineage.source_hashes(str(path))
        fresh = run_cli("hash", "--content", "--style", "a1111", "--json", "--rehash", path,
                        env={"SDTK_HASH_CACHE": "off", "SDTK_SHA2": "off"})
        again = json.loads(fresh.stdout)[0]
        for got in (row, again):
            assert recorded == {"sha256": got["SHA256"], "autov3": got["AutoV3"], "content_v2": got["ContentV2"]}


def test_interrupted_first_conversion_leaves_the_cache_consistent(tmp, monkeypatch):
    """A conversion that fails half way stops its source-hash read: the cache has no entry for
    the input (never a half-written one), and the next conversion computes and records the truth."""
    import json

    from sdtk.formats import open_model
    from sdtk.ops import convert as conv_mod

    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp / "cache.sqlite3"))
    src = tmp / "in.safetensors"
    write_safetensors(src, [from_array(f"t{i}", np.full(600_000, i, np.float32)) for i in range(64)], overwrite=True)
    real = conv_mod.write_safetensors

    def interrupted(dest, plan, *a, on_tensor=None, **k):
        def stop(t, done):
            if done > 30 * 2_400_000:
                raise KeyboardInterrupt
            if on_tensor:
                on_tensor(t, done)
        return real(dest, plan, *a, on_tensor=stop, **k)

    monkeypatch.setattr(conv_mod, "write_safetensors", interrupted)
    opts = conv_mod.resolve_options(conv_mod.ConvertOptions())
    try:
        conv_mod.convert_file(src, opts, output=tmp / "out.safetensors")
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the conversion was not interrupted")
    assert not (tmp / "out.safetensors").exists()
    entry = hash_cache.cached_hashes(src)
    assert entry == {} or all(entry.get(k) for k in lineage.HASH_NAMES)  # nothing, or complete
    monkeypatch.setattr(conv_mod, "write_safetensors", real)
    conv_mod.convert_file(src, opts, output=tmp / "out.safetensors")
    with open_model(tmp / "out.safetensors") as cat:
        step = json.loads(cat.metadata[lineage.LINEAGE_KEY])[-1]
    truth = lineage.source_hashes(str(src))
    assert {k: step[f"source_{k}"] for k in lineage.HASH_NAMES} == truth
    monkeypatch.setenv("SDTK_HASH_CACHE", "off")
    assert lineage.source_hashes(str(src)) == truth
