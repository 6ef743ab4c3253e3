"""An in-memory index of the library for the library page: 30,000 files searched, filtered and
sorted in a few milliseconds, where SQL LIKE over every column would read the whole table.

It holds, per present file under the roots: id, a lower-case search text (path, title, trigger
words, architecture, base model), kind, architecture, size, first seen, sha256, and the problem and
duplicate flags; the id lists are kept pre-sorted for every sort key. The rows of the page shown
are then read by id from SQLite. It reloads (in the background, at most every `min_interval`
seconds) when the database changed: `PRAGMA data_version` on its own connection tells when any
other connection (a scan, a job, `sdtk library scan` in a terminal) committed. Until the first
load is done (`sdtk serve` loads it before it answers), callers fall back to SQL (sdtk.web.catalog)."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sdtk.web.catalog import KIND_SQL, SORTS, Query, under_roots

LOAD_SQL = (f"SELECT id, path, title, trained_words, architecture, base_model, {KIND_SQL} AS ekind, size, first_seen, "
            "sha256, content_hash, (problem IS NOT NULL OR json_extract(info, '$.identity.problems') IS NOT NULL) AS bad "
            "FROM files WHERE status = 'present' AND {roots} ORDER BY path")


class Entry:
    __slots__ = ("id", "text", "kind", "architecture", "size", "first_seen", "sha256", "content", "bad", "dupe")

    def __init__(self, row):
        words = json.loads(row["trained_words"]) if row["trained_words"] else []
        self.id = row["id"]
        self.text = "\n".join([row["path"], row["title"] or "", ", ".join(words), row["architecture"] or "",
                               row["base_model"] or ""]).lower()
        self.kind, self.architecture = row["ekind"], row["architecture"]
        self.size, self.first_seen = row["size"], row["first_seen"] or 0
        self.sha256, self.content = row["sha256"] or "", row["content_hash"]
        self.bad, self.dupe = bool(row["bad"]), False


class LibraryIndex:
    def __init__(self, connect: Callable, roots: Sequence[str], min_interval: float = 2.0):
        self.connect, self.roots, self.min_interval = connect, list(roots), min_interval
        self._conn = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time (the job thread and a background refresh)
        self._table: Optional["_Table"] = None
        self._version: Optional[int] = None
        self._loaded_at = 0.0
        self._loading = False
        self.ready = threading.Event()

    # -- loading -----------------------------------------------------------------------------
    def start(self) -> None:
        self._reload_in_background()

    def _data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def _reload_in_background(self) -> None:
        with self._lock:
            if self._loading:
                return
            self._loading = True
        threading.Thread(target=self._load, daemon=True, name="sdtk-web-index").start()

    def _load(self) -> None:
        with self._load_lock:
            self._load_now()

    def _load_now(self) -> None:
        try:
            if self._conn is None:
                self._conn = self.connect()
            version = self._data_version()
            root_sql, args = under_roots(self.roots)
            entries = [Entry(r) for r in self._conn.execute(LOAD_SQL.format(roots=root_sql), args)]
            _flag_dupes(entries)
            table = _Table(entries)
            with self._lock:
                self._table = table
                self._version, self._loaded_at = version, time.monotonic()
            self.ready.set()
        finally:
            with self._lock:
                self._loading = False

    def reload(self) -> None:
        """Load now, in this thread (after this server changed the library: a job's output, a removal)."""
        self._load()

    def refresh(self) -> None:
        """Reload in the background when the database changed (at most every min_interval s)."""
        if self._conn is None or not self.ready.is_set():
            return
        with self._lock:
            stale = self._version != self._data_version() and time.monotonic() - self._loaded_at >= self.min_interval
        if stale:
            self._reload_in_background()

    # -- queries -----------------------------------------------------------------------------
    def search(self, q: Query) -> Tuple[List[int], int]:
        """(ids of the page, number of matches) for a library query."""
        self.refresh()
        with self._lock:
            table = self._table
        return table.search(q)

    def facets(self) -> Dict[str, List[str]]:
        with self._lock:
            table = self._table
        return {"kinds": [k for k in table.kind_names if k], "architectures": [a for a in table.arch_names if a]}


class _Table:
    """The index as arrays (numpy): one row per file in path order; per sort key the row order;
    kind and architecture codes; problem and duplicate flags; the search texts joined into one
    string (a substring search is then str.find over it, in C, not a Python loop over rows)."""

    def __init__(self, entries: List[Entry]):
        import numpy as np

        self.np = np
        n = len(entries)
        self.ids = np.array([e.id for e in entries], dtype=np.int64)
        self.kind_names = sorted({e.kind or "" for e in entries})
        self.arch_names = sorted({e.architecture or "" for e in entries})
        kind_code = {k: i for i, k in enumerate(self.kind_names)}
        arch_code = {a: i for i, a in enumerate(self.arch_names)}
        self.kinds = np.array([kind_code[e.kind or ""] for e in entries], dtype=np.int32)
        self.archs = np.array([arch_code[e.architecture or ""] for e in entries], dtype=np.int32)
        self.bad = np.array([e.bad for e in entries], dtype=bool)
        self.dupe = np.array([e.dupe for e in entries], dtype=bool)
        size = np.array([e.size for e in entries], dtype=np.int64)
        seen = np.array([e.first_seen for e in entries], dtype=np.float64)
        rows = np.arange(n)
        self.order = {  # stable sorts over path order: ties stay in path order, as SQL's "..., path"
            "path": rows, "size": np.argsort(-size, kind="stable"), "size-asc": np.argsort(size, kind="stable"),
            "architecture": np.argsort(np.array([arch_code[e.architecture or "~"] if e.architecture else len(self.arch_names)
                                                 for e in entries]), kind="stable"),
            "kind": np.argsort(self.kinds, kind="stable"), "recent": np.argsort(-seen, kind="stable")}
        self.text = "\x00".join(e.text for e in entries) + "\x00"
        self.starts = np.cumsum([0] + [len(e.text) + 1 for e in entries[:-1]]) if n else np.zeros(0, dtype=np.int64)
        self.shas = "\x00" + "\x00".join(e.sha256 for e in entries) + "\x00"
        self.sha_starts = np.cumsum([1] + [len(e.sha256) + 1 for e in entries[:-1]]) if n else np.zeros(0, dtype=np.int64)

    def _hits(self, haystack: str, starts, needle: str):
        """Rows whose text (in `haystack`, rows starting at `starts`) contains `needle`."""
        np = self.np
        found, pos, find, n = [], 0, haystack.find, len(starts)
        while True:
            pos = find(needle, pos)
            if pos < 0:
                break
            row = int(np.searchsorted(starts, pos, side="right")) - 1
            found.append(row)
            if row + 1 >= n:
                break
            pos = int(starts[row + 1])
        return found

    def search(self, q: Query) -> Tuple[List[int], int]:
        np = self.np
        mask = np.ones(len(self.ids), dtype=bool)
        text = q.q.lower().strip()
        if text:
            hit = np.zeros(len(self.ids), dtype=bool)
            hit[self._hits(self.text, self.starts, text)] = True
            if len(text) >= 8 and all(c in "0123456789abcdef" for c in text):  # a hash prefix (SHA256 / AutoV2)
                hit[self._hits(self.shas, self.sha_starts - 1, "\x00" + text)] = True
            mask &= hit
        if q.kind:
            mask &= self.kinds == (self.kind_names.index(q.kind) if q.kind in self.kind_names else -1)
        if q.architecture:
            mask &= self.archs == (self.arch_names.index(q.architecture) if q.architecture in self.arch_names else -1)
        if q.problems:
            mask &= self.bad
        if q.dupes:
            mask &= self.dupe
        order = self.order.get(q.sort, self.order["path"])
        matching = order[mask[order]]
        return [int(i) for i in self.ids[matching[q.offset:q.offset + q.limit]]], int(len(matching))


def _flag_dupes(entries: List[Entry]) -> None:
    """Same SHA256 twice, or same content hash under different SHA256s (as sdtk.library.query.find_dupes)."""
    by_sha = Counter(e.sha256 for e in entries if e.sha256)
    shas_by_content: Dict[str, set] = defaultdict(set)
    for e in entries:
        if e.content:
            shas_by_content[e.content].add(e.sha256)
    for e in entries:
        e.dupe = (bool(e.sha256) and by_sha[e.sha256] > 1) or (e.content is not None and len(shas_by_content[e.content]) > 1)
