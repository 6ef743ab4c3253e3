"""Removing duplicates without ever deleting. A file (and its sidecars) moves to
- the system trash (`sdtk.library.trash`, the freedesktop.org spec: the home trash or the
  volume's `.Trash-$UID`), the default; the file manager can restore it too;
- or, when no trash on the file's own device can be used (or `--remove-to quarantine`), the
  quarantine folder of its root, `<root>/.sdtk-quarantine/<time>/<path inside the root>`.
Both are renames on the same file system: instant, nothing copied (the library scan skips
dot-folders). Every move is recorded in an undo log (SQLite, in the server's state folder). Undo
moves it back, unless something new took its place."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from sdtk.errors import SdtkError
from sdtk.web.security import contained

QUARANTINE = ".sdtk-quarantine"

SCHEMA = """CREATE TABLE IF NOT EXISTS moves (
    id INTEGER PRIMARY KEY,
    batch TEXT NOT NULL,          -- one removal (a model and its sidecars)
    original TEXT NOT NULL,
    moved_to TEXT NOT NULL,
    file_id INTEGER,
    moved_at REAL NOT NULL,
    undone_at REAL,
    backend TEXT NOT NULL DEFAULT 'quarantine',  -- trash | quarantine
    info TEXT                     -- the trash's .trashinfo file
)"""
BACKENDS = ("trash", "quarantine")


def open_log(state_folder: "os.PathLike[str] | str") -> sqlite3.Connection:
    os.makedirs(state_folder, exist_ok=True)
    conn = sqlite3.connect(os.path.join(state_folder, "undo.sqlite3"), isolation_level=None, check_same_thread=False,
                           timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(SCHEMA)
    have = {r["name"] for r in conn.execute("PRAGMA table_info(moves)")}
    for column, decl in (("backend", "TEXT NOT NULL DEFAULT 'quarantine'"), ("info", "TEXT")):
        if column not in have:  # an undo log from before the trash backend
            conn.execute(f"ALTER TABLE moves ADD COLUMN {column} {decl}")
    return conn


def _root_of(real: str, roots: Sequence[str]) -> str:
    for r in sorted(roots, key=len, reverse=True):
        if contained(real, [r]):
            return r
    raise SdtkError(real, "is outside the folders this server serves; refused")


def remove(log: sqlite3.Connection, library: sqlite3.Connection, row, sidecars: List[str], roots: Sequence[str],
           backend: str = "trash", env: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """Move a model file (library row) and its sidecar files to the system trash (or the
    quarantine); record the moves. Returns {"batch", "backend", "moves", "note"}."""
    from sdtk.library import trash as T

    real = contained(row["path"], roots)
    if real is None:
        raise SdtkError(row["path"], "is outside the folders this server serves; refused")
    if not os.path.isfile(real):
        raise SdtkError(row["path"], "is no longer there; nothing was moved")
    st = os.stat(real)
    if (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
        raise SdtkError(real, "changed since it was indexed; nothing was moved (re-index, then decide again)")
    root = _root_of(real, roots)
    note = None
    bin_ = T.choose_trash(real, env) if backend == "trash" else None
    if backend == "trash" and bin_ is None:
        note = "no system trash on this file's drive can be used; moved to the quarantine folder instead"
    batch = time.strftime("%Y%m%d-%H%M%S") + f"-{row['id']}"
    moves = []
    for path in [real] + [os.path.join(os.path.dirname(real), n) for n in sidecars]:
        p = contained(path, roots)
        if p is None or not os.path.isfile(p) or (p != real and os.path.dirname(p) != os.path.dirname(real)):
            continue
        info = None
        if bin_ is not None:
            done = T.trash_file(p, bin_)
            target, info = done.moved_to, done.info
        else:
            target = os.path.join(root, QUARANTINE, batch, os.path.relpath(p, root))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                raise SdtkError(target, "already exists in the quarantine; nothing more was moved")
            os.rename(p, target)  # same file system (inside the root): atomic, nothing copied
        log.execute("INSERT INTO moves (batch, original, moved_to, file_id, moved_at, backend, info) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (batch, p, target, row["id"], time.time(), "trash" if bin_ is not None else "quarantine", info))
        moves.append({"from": p, "to": target})
    library.execute("UPDATE files SET status = 'missing' WHERE id = ?", (row["id"],))
    return {"batch": batch, "backend": "trash" if bin_ is not None else "quarantine", "moves": moves, "note": note}


def undo(log: sqlite3.Connection, batch: str, roots: Sequence[str]) -> List[str]:
    """Move a batch back. Refuses (changing nothing) when an original place is taken again."""
    from sdtk.library import trash as T

    rows = log.execute("SELECT * FROM moves WHERE batch = ? AND undone_at IS NULL ORDER BY id", (batch,)).fetchall()
    if not rows:
        raise SdtkError(None, f"nothing to undo for {batch}")
    for r in rows:
        where = "trash" if r["backend"] == "trash" else "quarantine"
        if os.path.exists(r["original"]):
            raise SdtkError(r["original"], "exists again; undo refused (nothing was moved back)")
        if contained(r["original"], roots) is None and contained(os.path.dirname(r["original"]), roots) is None:
            raise SdtkError(r["original"], "is outside the folders this server serves; refused")
        if not os.path.isfile(r["moved_to"]):
            raise SdtkError(r["moved_to"], f"is no longer in the {where} (restored or emptied elsewhere); undo refused")
    back = []
    for r in rows:
        if r["backend"] == "trash":
            T.restore(T.Trashed(r["original"], r["moved_to"], r["info"]))
        else:
            T.move_no_replace(r["moved_to"], r["original"])
        log.execute("UPDATE moves SET undone_at = ? WHERE id = ?", (time.time(), r["id"]))
        back.append(r["original"])
    return back


def history(log: sqlite3.Connection, limit: int = 50) -> List[Dict[str, Any]]:
    batches: Dict[str, Dict[str, Any]] = {}
    for r in log.execute("SELECT * FROM moves ORDER BY id DESC LIMIT ?", (limit * 8,)):
        b = batches.setdefault(r["batch"], {"batch": r["batch"], "moved_at": r["moved_at"], "undone": r["undone_at"] is not None,
                                            "backend": r["backend"], "files": []})
        b["files"].append({"original": r["original"], "moved_to": r["moved_to"]})
    return list(batches.values())[:limit]
