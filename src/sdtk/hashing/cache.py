"""A small persistent cache of file hashes, so a model file is hashed once in its life.

One cache for every command: `sdtk hash`, `sdtk library scan`, the lineage hashes of `convert`
and `merge` all read it first and add what they computed, so a file hashed by any of them is
never read again for its hashes while it is unchanged (`sdtk hash --rehash` reads it anyway).

Keyed on (real path, size, mtime_ns, inode): a file that changed in any of these is hashed again
(A1111 keys on path and mtime only, and keeps stale hashes when a file is replaced by an older
one). Values are dicts of hash name -> lower-case hex. The cache lives in the user's cache folder
(platformdirs), or where `SDTK_HASH_CACHE` points; `SDTK_HASH_CACHE=off` disables it. Any
problem with the cache (unwritable, damaged) is ignored: hashes are then simply computed."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    from sdtk.hashing.filehash import FileHashes

CACHE_ENV = "SDTK_HASH_CACHE"
_SCHEMA = "CREATE TABLE IF NOT EXISTS hashes (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, kinds TEXT, PRIMARY KEY (path, size, mtime_ns, inode))"


def cache_path() -> Optional[Path]:
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    from platformdirs import user_cache_path

    return user_cache_path("sdtk", appauthor=False) / "hashes.sqlite3"


def _key(path: "os.PathLike[str] | str"):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _connect() -> Optional[sqlite3.Connection]:
    where = cache_path()
    if where is None:
        return None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(where), timeout=5)
        conn.execute(_SCHEMA)
        return conn
    except (OSError, sqlite3.Error):
        return None


def cached_hashes(path: "os.PathLike[str] | str") -> Dict[str, str]:
    """The hashes known for this exact file (same path, size, mtime_ns and inode), or {}."""
    conn = _connect()
    if conn is None:
        return {}
    try:
        row = conn.execute("SELECT kinds FROM hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?", _key(path)).fetchone()
        return dict(json.loads(row[0])) if row else {}
    except (OSError, sqlite3.Error, ValueError):
        return {}
    finally:
        conn.close()


def remember_hashes(path: "os.PathLike[str] | str", hashes: Dict[str, str]) -> None:
    """Add `hashes` to what is known of this exact file."""
    conn = _connect()
    if conn is None:
        return
    try:
        key = _key(path)
        known = cached_hashes(path)
        known.update(hashes)
        with conn:
            conn.execute("DELETE FROM hashes WHERE path=?", key[:1])  # older versions of the file
            conn.execute("INSERT INTO hashes VALUES (?, ?, ?, ?, ?)", (*key, json.dumps(known, sort_keys=True)))
    except (OSError, sqlite3.Error):
        pass
    finally:
        conn.close()


# The FileHashes fields stored under their own names (values: hex strings, or ints for crc32 and
# autov3_start); "content" is sdtk's content hash.
FILE_FIELDS = ("sha256", "autov1_window", "autov3", "autov3_start", "crc32", "blake3")


def cached_file_hashes(path: "os.PathLike[str] | str", known: Optional[Dict[str, str]] = None) -> "Optional[FileHashes]":
    """The six file hashes of this exact file from the cache, or None when any is missing."""
    from sdtk.hashing.filehash import FileHashes

    known = cached_hashes(path) if known is None else known
    if not all(known.get(name) is not None for name in FILE_FIELDS):
        return None
    try:
        return FileHashes(size=os.stat(path).st_size, sha256=str(known["sha256"]), autov1_window=str(known["autov1_window"]),
                          autov3=str(known["autov3"]), autov3_start=int(known["autov3_start"]), crc32=int(known["crc32"]),
                          blake3=str(known["blake3"]))
    except (OSError, TypeError, ValueError):
        return None


def remember_file_hashes(path: "os.PathLike[str] | str", fh: "FileHashes", content: Optional[str] = None,
                         content_v2: Optional[str] = None) -> None:
    """Store the file hashes computed (and the content hashes, v1 "content" and v2 "content_v2",
    when known)."""
    values = {name: getattr(fh, name) for name in FILE_FIELDS if getattr(fh, name) is not None}
    if content:
        values["content"] = content
    if content_v2:
        values["content_v2"] = content_v2
    remember_hashes(path, values)
