"""The driver of `sdtk batch`: list, skip what is known, run the rest on an engine, keep one row per
object, summarise.

Incremental: an object whose (URL, size, ETag) equal those of its row in the results file (or in
the journal of an interrupted run) is not read again; rows whose error was a transport problem
(vanished, changed, unreachable, worker died...) are retried by the next run. The driver is the
only writer of rows, so every listed object gets exactly one row however often its task ran.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from sdtk.batch.listing import ObjectRef, list_sources
from sdtk.batch.results import Journal, read_journal, read_results, results_format, write_results
from sdtk.batch.work import COMMANDS
from sdtk.errors import EXIT_OK, EXIT_PROBLEMS, UsageError

# errors that say nothing about the object: the next run tries it again
RETRY_KINDS = {"vanished", "changed", "unreachable", "credentials", "denied", "io", "worker-died", "internal"}
ProgressCallback = Callable[["BatchSummary"], None]


@dataclass
class BatchSummary:
    command: str
    results: str
    engine: Dict[str, Any] = field(default_factory=dict)
    listed: int = 0
    skipped: int = 0  # unchanged since their row was written: not read
    processed: int = 0  # read in this run
    to_process: int = 0
    verdicts: Dict[str, int] = field(default_factory=dict)  # of every listed object
    errors: Dict[str, int] = field(default_factory=dict)  # error kind -> objects (every listed object)
    fetched_bytes: int = 0  # this run
    requests: int = 0
    object_bytes: int = 0  # sizes of the objects processed in this run
    seconds: float = 0.0
    rows: int = 0  # rows in the results file
    retried_chunks: int = 0
    interrupted: bool = False

    @property
    def objects_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    @property
    def fetched_bytes_per_s(self) -> float:
        return self.fetched_bytes / self.seconds if self.seconds else 0.0

    def exit_code(self) -> int:
        """0: every object read and fine; 1: some are unsafe, unreadable or had an error."""
        bad = sum(n for v, n in self.verdicts.items() if v in ("unsafe", "unreadable")) + sum(self.errors.values())
        return EXIT_PROBLEMS if bad else EXIT_OK

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(objects_per_s=round(self.objects_per_s, 2), fetched_bytes_per_s=round(self.fetched_bytes_per_s, 1),
                 fetched_bytes_per_object=round(self.fetched_bytes / self.processed, 1) if self.processed else None,
                 exit_code=self.exit_code())
        return d


def unchanged(row: Optional[Dict[str, Any]], ref: ObjectRef) -> bool:
    return (row is not None and row.get("size") == ref.size and row.get("etag") == ref.etag
            and row.get("error_kind") not in RETRY_KINDS)


def _chunks(refs: List[ObjectRef], command: str, max_objects: int, max_bytes: int) -> Iterator[List[ObjectRef]]:
    chunk: List[ObjectRef] = []
    size = 0
    for ref in refs:
        weight = max(ref.size, 0) if command == "hash" else 0
        if chunk and (len(chunk) >= max_objects or size + weight > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(ref)
        size += weight
    if chunk:
        yield chunk


def run_batch(command: str, sources: List[str], out: Path, engine, *, endpoint_url: Optional[str] = None,
              chunk_objects: Optional[int] = None, chunk_bytes: int = 256 * 1024 * 1024, prune: bool = False,
              on_progress: Optional[ProgressCallback] = None, progress_every: float = 1.0) -> BatchSummary:
    if command not in COMMANDS:
        raise UsageError(None, f"batch command must be one of {', '.join(COMMANDS)}")
    out = Path(out)
    results_format(out)
    if out.exists() and out.is_dir():
        raise UsageError(out, "--out is a folder; give a results file name (.jsonl, .parquet, .sqlite)")
    known = read_results(out, command)  # refuses another version/command before anything is read
    known.update(read_journal(out, command))
    start = time.perf_counter()
    summary = BatchSummary(command=command, results=str(out))
    refs = list(list_sources(sources, endpoint_url))
    summary.listed = len(refs)
    todo = [r for r in refs if not unchanged(known.get(r.url), r)]
    summary.skipped = len(refs) - len(todo)
    summary.to_process = len(todo)
    settings = {"endpoint_url": endpoint_url}
    journal = Journal(out, command)
    last = [0.0]

    def on_rows(rows: List[Dict[str, Any]]) -> None:
        fresh = [r for r in rows if r["url"] not in done_urls]  # exactly one row per object
        journal.append(fresh)
        for r in fresh:
            done_urls.add(r["url"])
            known[r["url"]] = r
            summary.processed += 1
            summary.fetched_bytes += r.get("fetched_bytes") or 0
            summary.requests += r.get("requests") or 0
            summary.object_bytes += max(r.get("size") or 0, 0)
        summary.seconds = time.perf_counter() - start
        if on_progress is not None and time.monotonic() - last[0] >= progress_every:
            last[0] = time.monotonic()
            on_progress(summary)

    done_urls: set = set()
    per_chunk = chunk_objects or (4 if command == "hash" else 16)
    try:
        if todo:  # nothing to read: no engine (no cluster) started at all
            engine.run(command, _chunks(todo, command, per_chunk, chunk_bytes), settings, on_rows)
    except KeyboardInterrupt:
        journal.close()
        summary.interrupted = True
        summary.seconds = time.perf_counter() - start
        summary.retried_chunks = getattr(engine, "retried", 0)
        return summary
    except BaseException:
        journal.close()  # kept: the next run continues from it
        raise
    summary.retried_chunks = getattr(engine, "retried", 0)
    summary.engine = engine.describe()
    listed = {r.url for r in refs}
    rows = [row for url, row in known.items() if not prune or url in listed]
    summary.rows = write_results(out, command, rows)
    journal.remove()
    for ref in refs:
        row = known.get(ref.url)
        if row is None:
            continue
        if row.get("error"):
            kind = row.get("error_kind") or "error"
            summary.errors[kind] = summary.errors.get(kind, 0) + 1
        elif row.get("verdict"):
            summary.verdicts[row["verdict"]] = summary.verdicts.get(row["verdict"], 0) + 1
    summary.seconds = time.perf_counter() - start
    return summary
