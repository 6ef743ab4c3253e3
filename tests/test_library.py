"""`sdtk library`: scan layouts and sidecars, the stat cache, vanished files and offline folders,
migrations, damage, two scans at once, and no pickle ever executed."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import SRC, run_cli
from helpers_library import comfy_and_a1111_tree, write_model, write_tiny_models
from sdtk.hashing import hash_file
from sdtk.library import Filters, find_dupes, find_hash, list_files, open_library, record_json, scan_library, show_file
from sdtk.library import db as dbmod
from sdtk.library import scan as scanmod


def rows_by_name(conn):
    return {os.path.basename(r["path"]): r for r in conn.execute("SELECT * FROM files")}


@pytest.fixture
def tree(tmp):
    return comfy_and_a1111_tree(tmp / "models")


def test_scan_follows_comfyui_a1111_and_extra_model_paths(tmp, tree):
    conn = open_library(tmp / "lib.db")
    report = scan_library(conn, [tree["comfy"]])
    assert report.problems == []
    rows = rows_by_name(conn)
    assert set(rows) == {"sd15.safetensors", "style.safetensors", "mystery.safetensors", "kl-f8.safetensors",
                         "v2.safetensors", "v2.vae.safetensors"}
    assert rows["sd15.safetensors"]["folder_kind"] == "checkpoint"
    assert rows["style.safetensors"]["folder_kind"] == "lora"
    assert rows["kl-f8.safetensors"]["folder_kind"] == "vae"
    assert rows["v2.safetensors"]["folder_kind"] == "checkpoint"  # reached through extra_model_paths.yaml
    for name, row in rows.items():  # hashes equal an independent one-file computation
        h = hash_file(row["path"])
        assert (row["sha256"], row["autov3"], row["blake3"]) == (h.sha256, h.autov3, h.blake3)
        assert row["crc32"] == h.formatted("a1111")["CRC32"] and row["content_hash"]
    assert rows["sd15.safetensors"]["format"] == "safetensors" and rows["sd15.safetensors"]["tensor_count"] > 100
    assert rows["sd15.safetensors"]["base_model"] == "SD 1.5" and rows["sd15.safetensors"]["title"] == "My SD"
    assert rows["v2.safetensors"]["precision"] == "fp16"


def test_sidecars_are_read(tmp, tree):
    conn = open_library(tmp / "lib.db")
    scan_library(conn, [tree["comfy"]])
    style = record_json(show_file(conn, str(tree["lora"]))[0])
    side = style["info"]["sidecars"]
    assert side["files"] == {"civitai": ["style.civitai.info"], "preview": ["style.preview.png"]}
    assert side["civitai"]["model_id"] == 111 and side["civitai"]["version_id"] == 222 and side["civitai"]["type"] == "LORA"
    assert style["base_model"] == "SDXL 1.0"  # Civitai's word beats nothing in the file
    assert style["trained_words"] == ["ink wash", "sumi-e", "inkwash style"]
    v2 = record_json(show_file(conn, "v2.safetensors")[0])  # a bare file name works too
    files = v2["info"]["sidecars"]["files"]
    assert files == {"cm-info": ["v2.cm-info.json"], "config": ["v2.yaml"], "user": ["v2.json"], "vae": ["v2.vae.safetensors"]}
    assert v2["base_model"] == "SD 2.1 768"
    assert v2["info"]["sidecars"]["user"]["description"] == "my v model"
    assert set(v2["trained_words"]) == {"vword", "act1", "act2"}


def test_unchanged_files_are_never_read_again(tmp, monkeypatch):
    write_tiny_models(tmp / "loras", 1000)
    conn = open_library(tmp / "lib.db")
    first = scan_library(conn, [tmp / "loras"])
    assert first.new == 1000 and first.hashed == 1000
    reads = []
    import sdtk.hashing.model as hashmod

    monkeypatch.setattr(scanmod, "cached_model_hashes", lambda *a, **k: reads.append(a) or pytest.fail("looked up"))
    monkeypatch.setattr(hashmod, "hash_file", lambda *a, **k: reads.append(a) or pytest.fail("re-read"))
    monkeypatch.setattr(hashmod, "hash_model_file", lambda *a, **k: reads.append(a) or pytest.fail("re-read"))
    import sdtk.formats

    monkeypatch.setattr(sdtk.formats, "open_model", lambda *a, **k: pytest.fail("opened an unchanged file"))
    t0 = time.perf_counter()
    again = scan_library(conn, [tmp / "loras"])
    elapsed = time.perf_counter() - t0
    assert (again.unchanged, again.hashed, again.new, again.changed, reads) == (1000, 0, 0, 0, [])
    assert elapsed < 10  # bench/bench_library.py measures it properly (target < 2 s)


def test_changed_files_are_always_read_again(tmp):
    folder = tmp / "loras"
    a, b, c = write_tiny_models(folder, 3)
    conn = open_library(tmp / "lib.db")
    scan_library(conn, [folder])
    before = rows_by_name(conn)
    # a: same size, same mtime, new bytes, new inode (replaced by rename, as downloaders do)
    st = os.stat(a)
    tmpfile = folder / "x.part"
    tmpfile.write_bytes(bytes(reversed(a.read_bytes()[-64:])).rjust(st.st_size, b" ")[:0] + a.read_bytes()[:-64] + b"\x01" * 64)
    os.utime(tmpfile, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmpfile, a)
    # b: same inode, same size, new mtime only
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    report = scan_library(conn, [folder])
    assert report.changed == 2 and report.unchanged == 1 and report.hashed == 2
    after = rows_by_name(conn)
    assert after[a.name]["sha256"] == hash_file(a).sha256 != before[a.name]["sha256"]
    assert after[b.name]["sha256"] == before[b.name]["sha256"]


def test_vanished_files_and_offline_folders_are_marked_missing_never_wiped(tmp, tree):
    conn = open_library(tmp / "lib.db")
    scan_library(conn, [tree["comfy"]])
    moved = tmp / "elsewhere.safetensors"
    shutil.move(tree["ckpt"], moved)
    r = scan_library(conn, [tree["comfy"]])
    assert r.missing == 1
    row = rows_by_name(conn)["sd15.safetensors"]
    assert row["status"] == "missing" and row["sha256"] and row["title"] == "My SD"
    assert [x["record"]["path"] for x in find_hash(conn, row["sha256"][:10])] == [row["path"]]
    assert not list_files(conn, Filters(name="sd15"))
    assert len(list_files(conn, Filters(name="sd15", include_missing=True))) == 1
    # the A1111 install goes offline (unplugged drive): its records stay, marked missing
    offline = tmp / "unplugged"
    shutil.move(tree["a1111"], offline)
    r = scan_library(conn, [tree["comfy"]])
    assert len(r.offline) == 2 and r.missing == 3  # models/VAE and models/Stable-diffusion
    assert [os.path.basename(p) for p in r.absent] == ["Lora", "LyCORIS"]  # named by the yaml, never there
    rows = rows_by_name(conn)
    assert rows["v2.safetensors"]["status"] == "missing" and rows["v2.safetensors"]["base_model"] == "SD 2.1 768"
    # everything comes back, unchanged: present again without reading a byte
    shutil.move(offline, tree["a1111"])
    shutil.move(moved, tree["ckpt"])
    r = scan_library(conn, [tree["comfy"]])
    assert r.returned == 4 and r.hashed == 0 and r.offline == []
    assert {row["status"] for row in rows_by_name(conn).values()} == {"present"}


def test_migration_from_schema_1_keeps_records_and_rehashes_nothing(tmp):
    path = write_model(tmp / "m" / "vae.safetensors")
    db = tmp / "old.db"
    conn = dbmod.connect(db, upto=1)
    h = hash_file(path)
    st = os.stat(path)
    conn.execute("INSERT INTO files (path, root, size, mtime_ns, inode, device, first_seen, last_seen, sha256, autov1, autov3, crc32, blake3)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", (str(path), str(path.parent), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev,
                                                        1.0, 1.0, h.sha256, h.autov1_window[:8], h.autov3, "00000000", h.blake3))
    assert dbmod.schema_version(conn) == 1
    conn.close()
    conn = open_library(db)
    assert dbmod.schema_version(conn) == dbmod.SCHEMA_VERSION == 3
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == [1, 2, 3]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    r = scan_library(conn, [path.parent])
    assert (r.unchanged, r.hashed, r.redescribed) == (1, 0, 1)  # described from the header, not re-hashed
    row = rows_by_name(conn)["vae.safetensors"]
    assert row["format"] == "safetensors" and row["kind"] and row["crc32"] == "00000000" and row["first_seen"] == 1.0


def test_newer_schema_is_refused_untouched(tmp):
    db = tmp / "new.db"
    conn = open_library(db)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    conn.close()
    r = run_cli("library", "list", "--db", db)
    assert r.returncode == 2 and "newer than this sdtk" in r.stderr


def test_damaged_database_names_the_rebuild_command(tmp, tree):
    db = tmp / "lib.db"
    r = run_cli("library", "scan", tree["comfy"], "--db", db, "--no-content")
    assert r.returncode == 0, r.stderr
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(db) + suffix):
            os.remove(str(db) + suffix)
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)  # the SQLite header is gone
    db.write_bytes(bytes(data))
    r = run_cli("library", "list", "--db", db)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "damaged" in r.stderr and f"sdtk library rebuild --db {db}" in r.stderr
    r = run_cli("library", "rebuild", tree["comfy"], "--db", db, "--json", "--no-content")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["new"] == 6 and os.path.exists(out["kept"])  # the damaged file is kept, renamed
    assert json.loads(run_cli("library", "info", "--db", db, "--json").stdout)["integrity"] == "ok"


def _open_in_step(barrier, paths, errors):
    for path in paths:
        barrier.wait(timeout=60)
        try:
            dbmod.connect(path).close()
        except Exception as e:  # noqa: BLE001 - reported to the parent
            errors.put(f"{path}: {e}")


def test_two_first_opens_at_once_both_succeed(tmp):
    """Two sdtk processes opening a new library in the same instant: SQLite fails the switch to
    WAL at once for one of them, without its busy handler (before the fix: 8 of 30 pairs)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    paths = [str(tmp / f"lib{i}.db") for i in range(25)]
    child = ctx.Process(target=_open_in_step, args=(barrier, paths, errors))
    child.start()
    _open_in_step(barrier, paths, errors)
    child.join(timeout=120)
    assert child.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    for path in paths:
        assert open_library(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_scans_at_once(tmp):
    write_tiny_models(tmp / "a", 150, seed=1)
    write_tiny_models(tmp / "b", 150, seed=2)
    write_model(tmp / "a" / "big.safetensors", "sd15-emaonly", scale=8)
    db = tmp / "lib.db"
    env = dict(os.environ, PYTHONPATH=SRC)
    cmd = [sys.executable, "-m", "sdtk", "library", "scan", str(tmp / "a"), str(tmp / "b"), "--db", str(db), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out)["seen"] == 301
    conn = open_library(db)
    assert tuple(conn.execute("SELECT COUNT(*), COUNT(DISTINCT path), COUNT(sha256) FROM files").fetchone()) == (301, 301, 301)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    big = rows_by_name(conn)["big.safetensors"]
    assert big["sha256"] == hash_file(big["path"]).sha256


def test_scanning_never_executes_a_pickle(tmp):
    folder = tmp / "Stable-diffusion"
    folder.mkdir()
    marker = tmp / "PWNED"
    # protocol-0 pickle calling os.system (the classic malicious .ckpt); a zip one for torch-zip
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "evil.ckpt").write_bytes(payload)
    import zipfile

    with zipfile.ZipFile(folder / "evil-zip.ckpt", "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    conn = open_library(tmp / "lib.db")
    report = scan_library(conn, [folder])
    assert not marker.exists()
    rows = rows_by_name(conn)
    assert set(rows) == {"evil.ckpt", "evil-zip.ckpt"}
    for name, row in rows.items():
        assert row["problem"] and row["sha256"] == hash_file(row["path"]).sha256  # hashed, never run
        assert row["format"] is None and row["content_hash"] is None
    assert report.problems == []  # unsafe files are recorded, not scan failures


def test_find_any_hash_kind_by_prefix_any_case(tmp, tree):
    conn = open_library(tmp / "lib.db")
    scan_library(conn, [tree["comfy"]])
    row = rows_by_name(conn)["style.safetensors"]
    h = hash_file(row["path"]).formatted("civitai")
    for kind, text in [("AutoV2", h["AutoV2"]), ("SHA256", h["SHA256"].lower()), ("AutoV3", h["AutoV3"]),
                       ("CRC32", h["CRC32"]), ("BLAKE3", h["BLAKE3"][:12].lower()), ("Content", row["content_hash"][:8].upper())]:
        hits = [x for x in find_hash(conn, text) if x["record"]["path"] == row["path"]]
        assert hits and kind in hits[0]["matched"], kind
    r = run_cli("library", "find", h["AutoV2"].lower(), "--db", tmp / "lib.db", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "style.safetensors"
    r = run_cli("library", "find", "deadbeefcafe", "--db", tmp / "lib.db")
    assert r.returncode == 1
    r = run_cli("library", "find", "xyz!", "--db", tmp / "lib.db")
    assert r.returncode == 2 and "not a hash" in r.stderr


def test_dupes_finds_identical_files_and_identical_weights(tmp):
    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.formats import open_model

    folder = tmp / "checkpoints"
    a = write_model(folder / "a.safetensors", "vae-sd-kl-f8", scale=16, seed=5, metadata={"note": "one"})
    shutil.copy(a, folder / "a-copy.safetensors")
    write_model(folder / "a-retitled.safetensors", "vae-sd-kl-f8", scale=16, seed=5, metadata={"note": "two"})
    with open_model(a) as cat:  # the same weights in a PyTorch zip checkpoint
        write_torch_zip(folder / "a.ckpt", list(cat.tensors.values()), wrap="state_dict")
    write_model(folder / "other.safetensors", "vae-sd-kl-f8", scale=16, seed=6)
    conn = open_library(tmp / "lib.db")
    scan_library(conn, [folder])
    groups = find_dupes(conn)
    files = [[os.path.basename(r["path"]) for r in g["rows"]] for g in groups["identical_files"]]
    weights = [[os.path.basename(r["path"]) for r in g["rows"]] for g in groups["identical_weights"]]
    assert files == [["a-copy.safetensors", "a.safetensors"]]
    assert weights == [["a-copy.safetensors", "a-retitled.safetensors", "a.ckpt", "a.safetensors"]]
    r = run_cli("library", "dupes", "--db", tmp / "lib.db", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and len(out["identical_files"]) == 1 and len(out["identical_weights"][0]["files"]) == 4


def test_list_filters(tmp, tree):
    conn = open_library(tmp / "lib.db")
    scan_library(conn, [tree["comfy"]])

    def names(**kw):
        return sorted(os.path.basename(r["path"]) for r in list_files(conn, Filters(**kw)))

    assert names(kind="lora") == ["mystery.safetensors", "style.safetensors"]
    kinds = {r["name"]: (r["kind"], r["folder_kind"]) for r in map(record_json, list_files(conn, Filters(kind="lora")))}
    assert kinds["style.safetensors"][0] == "lora"  # identified
    assert kinds["mystery.safetensors"] == ("lora", "lora")  # identify: unknown; the folder: loras
    assert names(base_model="sdxl") == ["style.safetensors"]  # the Civitai record's word
    assert names(trained_word="SUMI") == ["style.safetensors"]
    assert names(precision="fp16") == ["style.safetensors", "v2.safetensors"]
    assert names(name="kl-f8") == ["kl-f8.safetensors"]
    assert names(name="my sd") == ["sd15.safetensors"]  # title
    sizes = sorted(os.path.getsize(p) for p in (tree["ckpt"], tree["lora"]))
    assert len(names(min_size=sizes[-1])) >= 1 and all(
        os.path.getsize(r["path"]) <= sizes[0] for r in list_files(conn, Filters(max_size=sizes[0])))
    every = names()
    arch = rows_by_name(conn)["sd15.safetensors"]["architecture"]
    assert "sd15.safetensors" in names(architecture=arch) and len(names(architecture=arch)) < len(every)
    assert names(ema=True) == []  # no file of the tree carries EMA weights
    conn.execute("UPDATE files SET ema = 1 WHERE path = ?", (str(tree["ckpt"]),))  # as identify says of a full-EMA file
    assert names(ema=True) == ["sd15.safetensors"] and "sd15.safetensors" not in names(ema=False)
    r = run_cli("library", "list", "--db", tmp / "lib.db", "--kind", "lora", "--json")
    assert r.returncode == 0 and [x["name"] for x in json.loads(r.stdout)] == ["mystery.safetensors", "style.safetensors"]
    r = run_cli("library", "list", "--db", tmp / "lib.db", "--min-size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr


def test_library_db_location_from_env(tmp, tree):
    db = tmp / "envlib" / "library.sqlite3"
    r = run_cli("library", "scan", tree["comfy"] / "models" / "loras", "--quiet", env={"SDTK_LIBRARY_DB": str(db)})
    assert r.returncode == 0, r.stderr
    assert db.exists() and "2 model files" in r.stdout  # style + mystery
    r = run_cli("library", "scan", env={"SDTK_LIBRARY_DB": str(db)})  # no folders: the ones scanned before
    assert r.returncode == 0 and "unchanged 2" in r.stdout
