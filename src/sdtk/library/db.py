"""The library database: SQLite in WAL mode, a schema version with migrations, clear corruption errors.

- One file per user (platformdirs user data dir), `--db PATH` or `SDTK_LIBRARY_DB` to choose.
- WAL + busy_timeout: readers never block, two scans at once take turns writing short transactions.
- `schema_migrations` records every migration applied (version, name, time); `PRAGMA user_version`
  mirrors the latest. Migrations only add; a database from a newer sdtk is refused, not damaged.
- A damaged file raises `LibraryDamagedError` naming the rebuild command; `set_aside` moves the
  damaged file (and its -wal/-shm) away so nothing is ever deleted.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import List, Optional, Tuple

from sdtk.errors import SdtkError

DB_ENV = "SDTK_LIBRARY_DB"
BUSY_TIMEOUT_MS = 60_000

# (version, name, SQL). Append only: never edit a migration that has shipped.
MIGRATIONS: List[Tuple[int, str, str]] = [
    (1, "files and their hashes", """
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,      -- real path (symlinks resolved)
            root TEXT NOT NULL,             -- the scanned folder it was found under
            folder_kind TEXT,               -- from the folder layout: checkpoint, lora, vae, ...
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            device INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'present',   -- present | missing
            problem TEXT,                   -- why it could not be read as a model (one line)
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            hashed_at REAL,
            sha256 TEXT, autov1 TEXT, autov3 TEXT, crc32 TEXT, blake3 TEXT, content_hash TEXT
        );
        CREATE INDEX files_sha256 ON files(sha256);
        CREATE INDEX files_autov1 ON files(autov1);
        CREATE INDEX files_autov3 ON files(autov3);
        CREATE INDEX files_crc32 ON files(crc32);
        CREATE INDEX files_blake3 ON files(blake3);
        CREATE INDEX files_content ON files(content_hash);
        CREATE TABLE roots (
            path TEXT PRIMARY KEY,
            folder_kind TEXT,
            last_scanned REAL,
            online INTEGER NOT NULL DEFAULT 1
        );
    """),
    (2, "what each file is, and its sidecars", """
        ALTER TABLE files ADD COLUMN format TEXT;
        ALTER TABLE files ADD COLUMN tensor_count INTEGER;
        ALTER TABLE files ADD COLUMN parameters INTEGER;
        ALTER TABLE files ADD COLUMN dtypes TEXT;          -- JSON {dtype: tensor count}
        ALTER TABLE files ADD COLUMN precision TEXT;       -- fp16, bf16, fp32, fp8-e4m3fn, mixed
        ALTER TABLE files ADD COLUMN architecture TEXT;
        ALTER TABLE files ADD COLUMN kind TEXT;            -- checkpoint, lora, vae, embedding, ...
        ALTER TABLE files ADD COLUMN ema INTEGER;          -- 1 has EMA weights, 0 has none, NULL unknown
        ALTER TABLE files ADD COLUMN base_model TEXT;
        ALTER TABLE files ADD COLUMN title TEXT;
        ALTER TABLE files ADD COLUMN trained_words TEXT;   -- JSON list
        ALTER TABLE files ADD COLUMN info TEXT;            -- JSON: metadata subset, sidecar records
        ALTER TABLE files ADD COLUMN sidecar_sig TEXT;     -- sidecar names, sizes, mtimes
        ALTER TABLE files ADD COLUMN describe_version INTEGER;
        CREATE INDEX files_root ON files(root);
    """),
    # Rows described before this migration knew the type only (info.identity.prediction): it is kept,
    # its confidence and source stay NULL ("not recorded") until the next scan re-describes the file
    # from its header (describe.DESCRIBE_VERSION 3).
    (3, "prediction type with its confidence and evidence", """
        ALTER TABLE files ADD COLUMN prediction TEXT;             -- epsilon, v, flow, edm (NULL: unknown)
        ALTER TABLE files ADD COLUMN prediction_confidence TEXT;  -- high, medium, low, none (NULL: not recorded)
        ALTER TABLE files ADD COLUMN prediction_source TEXT;      -- marker, modelspec, kohya, config, architecture, heuristic, family-default
        ALTER TABLE files ADD COLUMN zero_terminal_snr INTEGER;   -- 1 ztsnr marker, 0 none (NULL: not recorded)
        UPDATE files SET prediction = json_extract(info, '$.identity.prediction')
            WHERE info IS NOT NULL AND json_valid(info);
        CREATE INDEX files_prediction ON files(prediction);
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class LibraryDamagedError(SdtkError):
    """The database file cannot be used; the message names the command that rebuilds it."""


def default_db_path() -> Path:
    """`SDTK_LIBRARY_DB`, else `<user data dir>/sdtk/library.sqlite3` (platformdirs)."""
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_path

    return user_data_path("sdtk", appauthor=False) / "library.sqlite3"


def rebuild_hint(db: Path) -> str:
    default = os.path.abspath(db) == os.path.abspath(default_db_path())
    return "sdtk library rebuild" + ("" if default else f" --db {db}")


def damaged(db: Path, err: Exception) -> LibraryDamagedError:
    return LibraryDamagedError(db, f"the library database is damaged ({err}); run `{rebuild_hint(db)}` "
                                   "(the damaged file is kept beside it) to rebuild it from your model folders")


def connect(db: "os.PathLike[str] | str", *, create: bool = True, upto: Optional[int] = None) -> sqlite3.Connection:
    """Open (and create or migrate) the library at `db`. `upto` stops migrating at a version (tests)."""
    db = Path(db)
    if not db.exists():
        if not create:
            raise SdtkError(db, "no library here yet; run `sdtk library scan DIR...` first")
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SdtkError(db.parent, f"cannot create the library folder: {e.strerror or e}") from None
    try:
        conn = sqlite3.connect(str(db), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise SdtkError(db, f"cannot open the library database: {e}") from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _when_not_locked(lambda: _use_wal(conn))
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        _when_not_locked(lambda: migrate(conn, db, upto))
    except sqlite3.DatabaseError as e:
        conn.close()
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise SdtkError(db, f"the library database is busy ({e}); another sdtk is writing, retry in a moment") from None
        raise damaged(db, e) from None
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        conn.execute("PRAGMA journal_mode = WAL")


def _when_not_locked(step, limit_s: float = BUSY_TIMEOUT_MS / 1000):
    """Run `step`, retrying while SQLite answers "database is locked" without waiting. Its busy
    handler does not cover every lock: switching a new database to WAL while a second sdtk opens
    it too fails at once (seen: 8 in 30 pairs of first scans started together)."""
    deadline = time.monotonic() + limit_s
    pause = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


def schema_version(conn: sqlite3.Connection) -> int:
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'").fetchone()
    if not has:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def migrate(conn: sqlite3.Connection, db: Path, upto: Optional[int] = None) -> int:
    """Apply the migrations this database lacks, each in its own transaction. Returns the version."""
    target = SCHEMA_VERSION if upto is None else upto
    current = schema_version(conn)
    if current == target:
        return current  # up to date: no write lock taken (readers of a read-only library work too)
    if current > SCHEMA_VERSION:
        raise SdtkError(db, f"the library database has schema version {current}, newer than this sdtk knows "
                            f"({SCHEMA_VERSION}); upgrade sdtk (the database was not changed)")
    conn.execute("BEGIN IMMEDIATE")  # one migrator at a time (two first scans at once); re-read inside
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise SdtkError(db, f"the library database has schema version {current}, newer than this sdtk knows "
                                f"({SCHEMA_VERSION}); upgrade sdtk (the database was not changed)")
        for version, name, sql in MIGRATIONS:
            if current < version <= target:
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", (version, name, time.time()))
                conn.execute(f"PRAGMA user_version = {version}")
                current = version
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return current


def _statements(sql: str) -> List[str]:
    out = []
    for part in sql.split(";"):
        lines = [ln.split("--")[0] for ln in part.splitlines()]
        text = "\n".join(lines).strip()
        if text:
            out.append(text)
    return out


def check_integrity(conn: sqlite3.Connection, db: Path) -> None:
    """Raise LibraryDamagedError unless SQLite's quick_check passes."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as e:
        raise damaged(db, e) from None
    if rows != ["ok"]:
        raise damaged(db, "; ".join(rows[:3]))


def set_aside(db: Path) -> Optional[Path]:
    """Move a damaged database (and its -wal/-shm files) to `<name>.damaged-<time>`; never delete."""
    if not db.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = db.with_name(f"{db.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        target = db.with_name(f"{db.name}.damaged-{stamp}-{n}")
        n += 1
    os.replace(db, target)
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    return target


def recover_roots(damaged_file: Path) -> List[str]:
    """The scanned folders recorded in a damaged database, when that much can still be read."""
    try:
        conn = sqlite3.connect(f"file:{damaged_file}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute("SELECT path FROM roots ORDER BY path")]
        finally:
            conn.close()
    except sqlite3.Error:
        return []
