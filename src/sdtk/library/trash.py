"""The system trash on Linux and other freedesktop.org desktops: files are moved, never deleted,
and can be restored (by sdtk's undo, or by the file manager's "Restore").

Source: the FreeDesktop.org Trash specification 1.0 (specifications.freedesktop.org/trash-spec):
- the home trash is `$XDG_DATA_HOME/Trash` (default `~/.local/share/Trash`), used for files on the
  same device (a rename: nothing is copied);
- a file on another volume goes to that volume's top directory: `$topdir/.Trash/$uid` when the
  administrator made `$topdir/.Trash` (a real folder, sticky bit set, not a symlink), else
  `$topdir/.Trash-$uid` (created when needed, mode 0700);
- each trash has `files/` and `info/`; `info/NAME.trashinfo` is created first, atomically
  (O_EXCL: a clash picks another NAME), then the file is renamed to `files/NAME`;
- `.trashinfo` holds `[Trash Info]`, `Path=` (URL-escaped bytes, RFC 2396: absolute in the home
  trash, relative to `$topdir` in a volume trash) and `DeletionDate=YYYY-MM-DDThh:mm:ss` (local time).

No copy across devices is ever made: when no trash on the file's own device can be used,
`choose_trash` returns None and the caller falls back to its quarantine folder.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional
from urllib.parse import quote, unquote_to_bytes


@dataclass(frozen=True)
class TrashDir:
    path: str  # the trash folder (holding files/ and info/)
    topdir: Optional[str]  # the volume's top directory (None: the home trash)

    @property
    def files(self) -> str:
        return os.path.join(self.path, "files")

    @property
    def info(self) -> str:
        return os.path.join(self.path, "info")


@dataclass(frozen=True)
class Trashed:
    original: str  # where the file was
    moved_to: str  # TRASH/files/NAME
    info: str  # TRASH/info/NAME.trashinfo


def home_trash(env: Mapping[str, str] = os.environ) -> str:
    data = env.get("XDG_DATA_HOME") or ""
    if not os.path.isabs(data):  # the spec: a relative value is invalid and ignored
        data = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "Trash")


def _device(path: str) -> Optional[int]:
    """The device of `path`, or of its nearest existing ancestor (a trash not made yet)."""
    p = path
    while True:
        try:
            return os.stat(p).st_dev
        except OSError:
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent


def mount_point(path: str) -> str:
    """The top directory of the volume holding `path` (the last ancestor on the same device)."""
    p = os.path.realpath(path)
    dev = os.stat(p).st_dev
    while True:
        parent = os.path.dirname(p)
        if parent == p or os.stat(parent).st_dev != dev:
            return p
        p = parent


def _usable(folder: str, create: bool) -> bool:
    """A trash folder that is a real directory we own (made with mode 0700 when `create`)."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        if not create:
            return False
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            st = os.lstat(folder)
        except OSError:
            return False
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and os.access(folder, os.W_OK | os.X_OK)


def choose_trash(path: str, env: Mapping[str, str] = os.environ,
                 topdir_of: Callable[[str], str] = mount_point) -> Optional[TrashDir]:
    """The trash a file moves to without being copied (same device), or None."""
    dev = os.stat(path).st_dev
    home = home_trash(env)
    if _device(home) == dev:
        if _usable(home, create=True):
            return TrashDir(home, None)
        return None
    top = topdir_of(path)
    uid = os.getuid()
    admin = os.path.join(top, ".Trash")
    try:
        st = os.lstat(admin)
        admin_ok = stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX)  # not a symlink, sticky
    except OSError:
        admin_ok = False
    candidates = ([os.path.join(admin, str(uid))] if admin_ok else []) + [os.path.join(top, f".Trash-{uid}")]
    for folder in candidates:
        if _usable(folder, create=True) and os.stat(folder).st_dev == dev:
            return TrashDir(folder, top)
    return None


def info_text(original: str, trash: TrashDir, when: Optional[float] = None) -> str:
    where = original if trash.topdir is None else os.path.relpath(original, trash.topdir)
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() if when is None else when))
    return f"[Trash Info]\nPath={quote(os.fsencode(where), safe='/')}\nDeletionDate={date}\n"


def read_info(info_path: str, trash: TrashDir) -> str:
    """The original absolute path a `.trashinfo` file records."""
    with open(info_path, "r", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or lines[0].strip() != "[Trash Info]":
        raise ValueError(f"{info_path}: not a trash info file")
    for line in lines[1:]:
        if line.startswith("Path="):
            where = os.fsdecode(unquote_to_bytes(line[5:]))
            return where if os.path.isabs(where) else os.path.join(trash.topdir or "/", where)
    raise ValueError(f"{info_path}: no Path")


def trash_file(path: str, trash: TrashDir) -> Trashed:
    """Move `path` into `trash` (info file first, O_EXCL; then a rename). Raises OSError, leaving
    nothing behind, when it cannot."""
    for folder in (trash.files, trash.info):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    text = info_text(os.path.abspath(path), trash).encode()
    for n in range(1, 10_000):
        candidate = name if n == 1 else f"{stem}.{n}{ext}"
        info = os.path.join(trash.info, candidate + ".trashinfo")
        target = os.path.join(trash.files, candidate)
        try:
            fd = os.open(info, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            if os.path.lexists(target):  # files/NAME without its info: leave it, take another name
                os.unlink(info)
                continue
            os.rename(path, target)
        except BaseException:
            try:
                os.unlink(info)
            except OSError:
                pass
            raise
        return Trashed(os.path.abspath(path), target, info)
    raise OSError(errno.EEXIST, "no free name in the trash")


def move_no_replace(src: str, dst: str) -> None:
    """Rename `src` to `dst` on one file system, never replacing a file that appeared at `dst`
    meanwhile (a hard link fails on an existing name; then the old name is dropped). Where hard
    links are not supported, a plain rename after the caller's check."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        os.rename(src, dst)
        return
    os.unlink(src)


def restore(item: Trashed) -> None:
    """Move a trashed file back and drop its info file. Raises FileExistsError when something new
    took the original place, FileNotFoundError when it is no longer in the trash."""
    if os.path.lexists(item.original):
        raise FileExistsError(errno.EEXIST, "exists again", item.original)
    if not os.path.lexists(item.moved_to):
        raise FileNotFoundError(errno.ENOENT, "is no longer in the trash (restored or emptied elsewhere)", item.moved_to)
    os.makedirs(os.path.dirname(item.original), exist_ok=True)
    move_no_replace(item.moved_to, item.original)
    try:
        os.unlink(item.info)
    except FileNotFoundError:
        pass
