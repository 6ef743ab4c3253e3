"""A small persistent cache of file hashes, so a model file is hashed once in its life.

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
from typing import Dict, Optional

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
