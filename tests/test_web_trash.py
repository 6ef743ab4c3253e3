"""Removal never deletes: the system trash (freedesktop.org Trash spec: the home trash under
$XDG_DATA_HOME, or a volume's .Trash-$UID, with percent-encoded .trashinfo files), restore by undo,
the quarantine folder as the fallback. Every test points XDG_DATA_HOME at a temporary folder (and
conftest does so for the whole session): the user's own trash is never touched."""
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from pathlib import Path

import pytest

from sdtk.library import trash as T

NAME = "odd name %41 #1 é.safetensors"


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


def test_home_trash_info_file_and_restore(tmp_path, xdg):
    folder = tmp_path / "models"
    folder.mkdir()
    f = folder / NAME
    f.write_bytes(b"weights")
    bin_ = T.choose_trash(str(f))
    assert bin_ == T.TrashDir(str(xdg / "Trash"), None)
    before = time.time()
    done = T.trash_file(str(f), bin_)
    assert not f.exists() and Path(done.moved_to) == xdg / "Trash" / "files" / NAME
    assert Path(done.moved_to).read_bytes() == b"weights"
    text = Path(done.info).read_text()
    assert Path(done.info) == xdg / "Trash" / "info" / (NAME + ".trashinfo")
    lines = text.splitlines()
    assert lines[0] == "[Trash Info]"
    # the absolute path, URL-escaped bytes (RFC 2396): space, %, # and UTF-8 é escaped, / kept
    encoded = str(folder).replace(" ", "%20") + "/odd%20name%20%2541%20%231%20%C3%A9.safetensors"
    assert lines[1] == "Path=" + encoded
    m = re.fullmatch(r"DeletionDate=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", lines[2])
    assert m and abs(time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) - before) < 5
    assert T.read_info(done.info, bin_) == str(f)
    assert stat.S_IMODE(os.stat(xdg / "Trash").st_mode) == 0o700
    # a second file of the same name takes another name; the first stays
    g = tmp_path / NAME
    g.write_bytes(b"other")
    second = T.trash_file(str(g), bin_)
    assert Path(second.moved_to).name == "odd name %41 #1 é.2.safetensors" and Path(done.moved_to).exists()
    assert T.read_info(second.info, bin_) == str(g)
    # restore: refused while something new sits at the original place; then back, info gone
    f.write_bytes(b"new")
    with pytest.raises(FileExistsError):
        T.restore(done)
    assert Path(done.moved_to).exists() and Path(done.info).exists() and f.read_bytes() == b"new"
    f.unlink()
    T.restore(done)
    assert f.read_bytes() == b"weights" and not Path(done.info).exists() and not Path(done.moved_to).exists()
    Path(second.moved_to).unlink()  # emptied by the file manager
    with pytest.raises(FileNotFoundError):
        T.restore(second)


def _other_device(tmp_path):
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev):
        pytest.skip("needs a writable /dev/shm on another device than the temporary folder (a second volume)")
    return Path(tempfile.mkdtemp(dir=shm, prefix="sdtk-trash-test-"))


def test_volume_trash_on_another_device(tmp_path, xdg):
    vol = _other_device(tmp_path)
    try:
        assert T.mount_point(str(vol)) == "/dev/shm"
        f = vol / "sub" / "a b.safetensors"
        f.parent.mkdir()
        f.write_bytes(b"x")
        topdir = lambda p: str(vol)  # noqa: E731  (the volume's top directory, kept inside the test folder)
        bin_ = T.choose_trash(str(f), topdir_of=topdir)
        assert bin_ == T.TrashDir(str(vol / f".Trash-{os.getuid()}"), str(vol))  # never the home trash: no copy
        done = T.trash_file(str(f), bin_)
        assert not (xdg / "Trash").exists()
        assert Path(done.info).read_text().splitlines()[1] == "Path=sub/a%20b.safetensors"  # relative to $topdir
        assert T.read_info(done.info, bin_) == str(f)
        assert stat.S_IMODE(os.stat(bin_.path).st_mode) == 0o700
        T.restore(done)
        assert f.read_bytes() == b"x"
        # an administrator's $topdir/.Trash with the sticky bit: $topdir/.Trash/$uid
        admin = vol / ".Trash"
        admin.mkdir()
        assert T.choose_trash(str(f), topdir_of=topdir).path == str(vol / f".Trash-{os.getuid()}")  # no sticky bit: ignored
        os.chmod(admin, 0o1777)
        assert T.choose_trash(str(f), topdir_of=topdir).path == str(admin / str(os.getuid()))
        shutil.rmtree(admin)
        os.symlink(tmp_path, admin)  # a symlinked .Trash is never used
        assert T.choose_trash(str(f), topdir_of=topdir).path == str(vol / f".Trash-{os.getuid()}")
    finally:
        shutil.rmtree(vol)


def test_no_usable_trash_is_none(tmp_path, monkeypatch):
    vol = _other_device(tmp_path)
    try:
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        f = vol / "m.safetensors"
        f.write_bytes(b"x")
        (vol / f".Trash-{os.getuid()}").write_text("not a folder")
        assert T.choose_trash(str(f), topdir_of=lambda p: str(vol)) is None
    finally:
        shutil.rmtree(vol)


# -- the web app's duplicates page over the trash -------------------------------------------------
from helpers_webapp import HX, build, client_for, file_id, last_job, wait_job  # noqa: E402


@pytest.fixture
def dupe(tmp_path, xdg):
    sample = build(tmp_path)
    lora = sample["lora"]
    copy = lora.parent / "inkwash-copy.safetensors"
    shutil.copy2(lora, copy)
    shutil.copy2(lora.parent / "inkwash.preview.png", lora.parent / "inkwash-copy.preview.png")
    with client_for(tmp_path, sample) as lib:
        lib.post("/run/index", headers=HX)
        assert wait_job(lib, last_job(lib).id).state == "done"
        lib.sample, lib.copy, lib.xdg = sample, copy, xdg
        yield lib


def test_duplicate_goes_to_the_system_trash_and_undo_restores(dupe):
    lib, copy, xdg = dupe, dupe.copy, dupe.xdg
    preview = copy.parent / "inkwash-copy.preview.png"
    assert "Move to the trash" in lib.get("/dupes").text
    r = lib.post("/dupes/remove", data={"file": file_id(lib, copy)}, headers=HX).text
    assert "moved 2 file(s) to the system trash" in r, r
    assert not copy.exists() and not preview.exists()
    files, info = xdg / "Trash" / "files", xdg / "Trash" / "info"
    assert sorted(p.name for p in files.iterdir()) == ["inkwash-copy.preview.png", "inkwash-copy.safetensors"]
    assert (files / "inkwash-copy.safetensors").read_bytes() == lib.sample["lora"].read_bytes()
    assert f"Path={copy}" in (info / "inkwash-copy.safetensors.trashinfo").read_text()
    assert not (lib.sample["root"] / ".sdtk-quarantine").exists()
    assert "inkwash-copy.safetensors" not in lib.get("/").text
    batch = lib.web.undo_log.execute("SELECT batch FROM moves").fetchone()["batch"]
    assert "moved back" in lib.post("/dupes/undo", data={"batch": batch}, headers=HX).text
    assert copy.read_bytes() == lib.sample["lora"].read_bytes() and preview.exists()
    assert not list(files.iterdir()) and not list(info.iterdir())
    assert "inkwash-copy.safetensors" in lib.get("/").text


def test_undo_after_the_trash_was_emptied_is_refused(dupe):
    lib, xdg = dupe, dupe.xdg
    lib.post("/dupes/remove", data={"file": file_id(lib, dupe.copy)}, headers=HX)
    shutil.rmtree(xdg / "Trash" / "files")
    batch = lib.web.undo_log.execute("SELECT batch FROM moves").fetchone()["batch"]
    r = lib.post("/dupes/undo", data={"batch": batch}, headers=HX).text
    assert 'class="msg error"' in r and "no longer in the trash" in r
    assert lib.get("/dupes").status_code == 200


def test_quarantine_is_the_fallback(dupe, monkeypatch):
    monkeypatch.setattr(T, "choose_trash", lambda path, env=None: None)
    r = dupe.post("/dupes/remove", data={"file": file_id(dupe, dupe.copy)}, headers=HX).text
    assert "to the quarantine" in r and "no system trash" in r
    assert len(list((dupe.sample["root"] / ".sdtk-quarantine").rglob("inkwash-copy.safetensors"))) == 1
    assert not (dupe.xdg / "Trash").exists()


def test_undo_log_from_before_the_trash_is_upgraded(tmp_path):
    from sdtk.web.quarantine import history, open_log

    old = sqlite3.connect(tmp_path / "undo.sqlite3")
    old.execute("CREATE TABLE moves (id INTEGER PRIMARY KEY, batch TEXT NOT NULL, original TEXT NOT NULL, "
                "moved_to TEXT NOT NULL, file_id INTEGER, moved_at REAL NOT NULL, undone_at REAL)")
    old.execute("INSERT INTO moves (batch, original, moved_to, moved_at) VALUES ('b1', '/x', '/q/x', 1.0)")
    old.commit()
    old.close()
    log = open_log(tmp_path)
    assert history(log)[0]["backend"] == "quarantine"
