"""The results file of `sdtk batch`: JSON lines, Parquet or SQLite by extension; one row per object.

Resumable without ever leaving a half-written results file:
- while a run goes on, every finished row is appended to a journal beside the results file
  (`.<name>.sdtk-journal`, JSON lines, flushed per row, fsynced every second);
- at the end the previous results and the journal are merged (one row per URL, the newest wins)
  and written atomically (temporary file, fsync, rename); then the journal is removed;
- an interrupted run leaves the previous results file intact and the journal: the next run reads
  both and carries on where it stopped.

Every results file says which sdtk results version and which command wrote it (JSON lines: a
first header line; Parquet: schema metadata; SQLite: a `batch_meta` table); a file of another
version or command is refused with a one-line message, never overwritten.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from sdtk.batch.work import COLUMNS, COLUMN_NAMES, RESULTS_VERSION
from sdtk.errors import OutputError, SdtkError, UsageError
from sdtk.fileio import AtomicOutput

HEADER_KEY = "sdtk_batch_results"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}


class ResultsFileError(SdtkError):
    """The results file cannot be used for this run (another version, another command, damaged)."""


def results_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(path, f"results file name must end in one of {', '.join(sorted(FORMATS))} (JSON lines, Parquet, SQLite)")
    return fmt


def journal_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sdtk-journal")


def _check_header(path: Path, header: Dict[str, Any], command: Optional[str]) -> str:
    version = header.get(HEADER_KEY)
    if version != RESULTS_VERSION:
        raise ResultsFileError(path, f"results file of another sdtk version (results format {version!r}, this sdtk "
                                     f"writes {RESULTS_VERSION}); give another --out or move it away (it was not changed)")
    found = header.get("command")
    if command is not None and found != command:
        raise ResultsFileError(path, f"holds `sdtk batch {found}` results; give another --out for `batch {command}` (it was not changed)")
    return found


def read_results(path: Path, command: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """url -> row of an existing results file ({} when there is none); checks version and command."""
    path = Path(path)
    if not path.exists():
        return {}
    fmt = results_format(path)
    try:
        if fmt == "jsonl":
            rows = _read_jsonl(path, command)
        elif fmt == "parquet":
            rows = _read_parquet(path, command)
        else:
            rows = _read_sqlite(path, command)
    except (ResultsFileError, UsageError):
        raise
    except Exception as e:
        raise ResultsFileError(path, f"not a readable sdtk batch results file ({type(e).__name__}: {str(e)[:120]}); "
                                     "give another --out (it was not changed)") from None
    return {r["url"]: r for r in rows}


def _read_jsonl(path: Path, command: Optional[str]) -> List[Dict[str, Any]]:
    with open(path, "r", encoding="utf-8") as fh:
        first = fh.readline()
        if not first.strip():
            raise ResultsFileError(path, "empty results file; give another --out or delete it")
        try:
            header = json.loads(first)
        except ValueError:
            header = {}
        if not isinstance(header, dict) or HEADER_KEY not in header:
            raise ResultsFileError(path, "not an sdtk batch results file (no header line); give another --out (it was not changed)")
        _check_header(path, header, command)
        return [json.loads(line) for line in fh if line.strip()]


def _read_parquet(path: Path, command: Optional[str]) -> List[Dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    header = json.loads(meta.get(HEADER_KEY, "{}")) if HEADER_KEY in meta else {}
    if HEADER_KEY not in header:
        raise ResultsFileError(path, "not an sdtk batch results file (no sdtk metadata); give another --out (it was not changed)")
    _check_header(path, header, command)
    return table.to_pylist()


def _read_sqlite(path: Path, command: Optional[str]) -> List[Dict[str, Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        try:
            meta = dict(conn.execute("SELECT key, value FROM batch_meta").fetchall())
        except sqlite3.Error:
            raise ResultsFileError(path, "not an sdtk batch results file (no batch_meta table); give another --out (it was not changed)") from None
        header = {HEADER_KEY: int(meta.get(HEADER_KEY, 0)), "command": meta.get("command")}
        _check_header(path, header, command)
        return [dict(r) for r in conn.execute("SELECT * FROM results ORDER BY url")]
    finally:
        conn.close()


def read_journal(path: Path, command: str) -> Dict[str, Dict[str, Any]]:
    """Rows of an interrupted run (a torn last line is ignored)."""
    jpath = journal_path(path)
    rows: Dict[str, Dict[str, Any]] = {}
    if not jpath.exists():
        return rows
    with open(jpath, "r", encoding="utf-8") as fh:
        header = None
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # the line being written when the run was killed
            if header is None:
                header = obj
                if not isinstance(obj, dict) or HEADER_KEY not in obj:
                    raise ResultsFileError(jpath, "not an sdtk batch journal; move it away")
                _check_header(jpath, obj, command)
                continue
            if isinstance(obj, dict) and "url" in obj:
                rows[obj["url"]] = obj
    return rows


class Journal:
    """Append-only JSON lines of finished rows, fsynced at least every `sync_every` seconds."""

    def __init__(self, results: Path, command: str, sync_every: float = 1.0):
        self.path = journal_path(results)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise OutputError(self.path, f"cannot write the journal beside the results: {e.strerror or e}") from None
        import fcntl

        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise OutputError(results, "another sdtk batch is writing these results now; wait for it or give another --out") from None
        if fresh:
            self._write({HEADER_KEY: RESULTS_VERSION, "command": command})
        else:
            self.file.write("\n")  # end a torn last line, if any (empty lines are skipped)
        self.sync_every = sync_every
        self.last_sync = time.monotonic()

    def _write(self, obj: Dict[str, Any]) -> None:
        self.file.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")

    def append(self, rows: Iterable[Dict[str, Any]]) -> None:
        for row in rows:
            self._write(row)
        self.file.flush()
        now = time.monotonic()
        if now - self.last_sync >= self.sync_every:
            os.fsync(self.file.fileno())
            self.last_sync = now

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def write_results(path: Path, command: str, rows: Iterable[Dict[str, Any]]) -> int:
    """Write every row (sorted by URL) atomically in the format the name asks for. Returns rows."""
    path = Path(path)
    fmt = results_format(path)
    ordered = sorted(rows, key=lambda r: r["url"])
    header = {HEADER_KEY: RESULTS_VERSION, "command": command}
    if fmt == "jsonl":
        with AtomicOutput(path, overwrite=True) as out:
            out.write((json.dumps(header) + "\n").encode())
            for r in ordered:
                out.write((json.dumps({c: r.get(c) for c in COLUMN_NAMES}, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
        schema = pa.schema([(c, types[t]) for c, t in COLUMNS], metadata={HEADER_KEY: json.dumps(header)})
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMN_NAMES} for r in ordered], schema=schema)
        with AtomicOutput(path, overwrite=True) as out:
            pq.write_table(table, out, compression="zstd")
    else:
        _write_sqlite(path, header, ordered)
    return len(ordered)


def _write_sqlite(path: Path, header: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    sql_types = {"str": "TEXT", "int": "INTEGER", "float": "REAL"}
    # SQLite writes its own file: build it beside the destination, then rename it into place
    atomic = AtomicOutput(path, overwrite=True)
    with atomic as out:
        temp = atomic.temp_path
        conn = sqlite3.connect(temp)
        try:
            conn.execute("CREATE TABLE batch_meta (key TEXT PRIMARY KEY, value TEXT)")
            conn.executemany("INSERT INTO batch_meta VALUES (?, ?)", [(k, str(v)) for k, v in header.items()])
            cols = ", ".join(f"{c} {sql_types[t]}" + (" PRIMARY KEY" if c == "url" else "") for c, t in COLUMNS)
            conn.execute(f"CREATE TABLE results ({cols})")
            marks = ", ".join("?" for _ in COLUMNS)
            conn.executemany(f"INSERT INTO results VALUES ({marks})", [tuple(r.get(c) for c in COLUMN_NAMES) for r in rows])
            conn.commit()
        finally:
            conn.close()
        out.seek(0, os.SEEK_END)  # AtomicOutput fsyncs and renames the file sqlite wrote
