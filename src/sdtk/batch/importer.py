"""`sdtk library import RESULTS`: the rows of `sdtk batch` results in the local library (and, for
local files that are unchanged, in the shared hash cache, so `sdtk hash` / `library scan` never
read them again).

- One library record per URL (s3://..., https://..., or a local path); results of `batch
  inspect`, `scan` and `hash` of the same object add up (columns of one fill what another left
  empty); a record of an older version of the object (other size or ETag/mtime) is replaced.
- Rows with an error (vanished, changed, refused...) are not imported: they say nothing about the
  object. Unsafe or unreadable objects are imported with their reason as the record's problem.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sdtk.batch.results import read_results
from sdtk.library.describe import DESCRIBE_VERSION, PREDICTION_COLUMNS, prediction_columns

DATA_COLUMNS = ("problem", "hashed_at", "sha256", "autov1", "autov3", "crc32", "blake3", "format", "tensor_count",
                "parameters", "dtypes", "precision", "architecture", "kind", "ema", "base_model", "title", "info",
                "describe_version") + PREDICTION_COLUMNS


@dataclass
class ImportReport:
    results: str
    command: Optional[str] = None
    rows: int = 0
    imported: int = 0
    new: int = 0
    updated: int = 0
    replaced: int = 0  # the object changed since the library knew it
    skipped_errors: int = 0
    hash_cache: int = 0  # local files whose hashes went into the hash cache
    seconds: float = 0.0
    problems: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _root_of(url: str) -> str:
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"
    return os.path.dirname(url)


def _local_identity(row: Dict[str, Any]) -> Tuple[int, int, int]:
    """(mtime_ns, inode, device) of a local file whose size and mtime still match the row, else
    the mtime from the row's ETag and zeros (the library re-reads it at its next scan)."""
    etag = row.get("etag") or ""
    mtime_ns = int(etag.split("-", 1)[0]) if etag.split("-", 1)[0].isdigit() else 0
    try:
        st = os.stat(row["url"])
    except OSError:
        return mtime_ns, 0, 0
    if st.st_size == row.get("size") and st.st_mtime_ns == mtime_ns:
        return mtime_ns, st.st_ino, st.st_dev
    return mtime_ns, 0, 0


def _record(row: Dict[str, Any], now: float) -> Dict[str, Any]:
    url = row["url"]
    local = "://" not in url
    mtime_ns, inode, device = _local_identity(row) if local else (0, 0, 0)
    rec: Dict[str, Any] = {"path": url, "root": _root_of(url), "size": row.get("size") or 0, "mtime_ns": mtime_ns,
                           "inode": inode, "device": device, "status": "present", "first_seen": now, "last_seen": now}
    verdict = row.get("verdict")
    rec["problem"] = row.get("reason") if verdict in ("unsafe", "unreadable") else None
    if row.get("sha256"):
        rec.update(sha256=row["sha256"], autov1=row.get("autov1"), autov3=row.get("autov3"), crc32=row.get("crc32"),
                   blake3=row.get("blake3"), hashed_at=now)
    for k in ("format", "tensor_count", "parameters", "dtypes", "precision", "architecture", "kind", "ema", "base_model",
              "title", "info"):
        if row.get(k) is not None:
            rec[k] = row[k]
    if row.get("command") == "inspect" and verdict == "safe":
        rec["describe_version"] = DESCRIBE_VERSION
        try:  # the same `info` a scan stores: the prediction type with its confidence and source
            rec.update(prediction_columns(json.loads(row["info"]) if row.get("info") else None))
        except (TypeError, ValueError):
            pass
    return rec


def _remember_hashes(row: Dict[str, Any]) -> bool:
    """Put a local, unchanged file's six hashes into the shared hash cache."""
    from sdtk.hashing.cache import remember_file_hashes
    from sdtk.hashing.filehash import FileHashes

    if "://" in row["url"] or not row.get("sha256") or not row.get("autov1_window"):
        return False
    mtime_ns, inode, _ = _local_identity(row)
    if not inode:
        return False
    fh = FileHashes(size=row["size"], sha256=row["sha256"], autov1_window=row["autov1_window"], autov3=row["autov3"],
                    autov3_start=int(row["autov3_start"]), crc32=int.from_bytes(bytes.fromhex(row["crc32"]), "little"),
                    blake3=row["blake3"])
    remember_file_hashes(row["url"], fh)
    return True


def import_results(conn: sqlite3.Connection, results: "os.PathLike[str] | str") -> ImportReport:
    start = time.perf_counter()
    report = ImportReport(str(results))
    rows = read_results(Path(results))  # refuses files of another version
    report.rows = len(rows)
    now = time.time()
    batch: List[Dict[str, Any]] = []
    for row in rows.values():
        report.command = report.command or row.get("command")
        if row.get("error"):
            report.skipped_errors += 1
            continue
        batch.append(row)
    for i in range(0, len(batch), 1000):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row in batch[i:i + 1000]:
                _upsert(conn, _record(row, now), report)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    for row in batch:
        if _remember_hashes(row):
            report.hash_cache += 1
    report.imported = len(batch)
    report.seconds = time.perf_counter() - start
    return report


def _upsert(conn: sqlite3.Connection, rec: Dict[str, Any], report: ImportReport) -> None:
    old = conn.execute("SELECT * FROM files WHERE path=?", (rec["path"],)).fetchone()
    if old is None:
        report.new += 1
    elif (old["size"], old["mtime_ns"]) == (rec["size"], rec["mtime_ns"]):
        report.updated += 1
        merged = {k: old[k] for k in DATA_COLUMNS}
        merged.update({k: v for k, v in rec.items() if k in DATA_COLUMNS and v is not None})
        if rec.get("problem") is None and rec.get("format") is not None:
            merged["problem"] = None  # a clean read clears an older problem
        rec = {**rec, **merged, "first_seen": old["first_seen"]}
    else:
        report.replaced += 1
        rec = {**rec, "first_seen": old["first_seen"]}
    conn.execute("DELETE FROM files WHERE path=?", (rec["path"],))
    cols = ", ".join(rec)
    conn.execute(f"INSERT INTO files ({cols}) VALUES ({', '.join('?' for _ in rec)})", tuple(rec.values()))
