"""`sdtk library scan`: walk model folders, hash and describe each model file, remember it.

The cache: a file whose (path, size, mtime_ns, inode) equal the stored ones is never read again
(its sidecars are re-read only when one of them changed, its description only when sdtk's
description got better: both from small files or the header). Any difference: read and hashed
again, all six hashes and the content hash in one read (safetensors).

Files that vanish, and folders that are not there (an unplugged drive), are marked `missing`;
their records (hashes, Civitai info) are kept, and come back as they were when the file does.

Safety: models are opened with `sdtk.formats.open_model` (header only; pickles through the
restricted interpreter: nothing is imported or executed) and hashed by streaming; no model is
ever loaded into memory.

Concurrency: hashing happens outside any transaction; each file's record is written in a short
`BEGIN IMMEDIATE` transaction (busy_timeout waits for the other writer), so two scans at once
both finish, and a record is never half written.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from sdtk.errors import SdtkError
from sdtk.hashing.content import content_hash
from sdtk.hashing.cache import cached_hashes, remember_hashes
from sdtk.hashing.model import cached_model_hashes
from sdtk.hashing.styles import crc32_civitai_hex
from sdtk.library.describe import DESCRIBE_VERSION, PREDICTION_COLUMNS, describe_for_library
from sdtk.library.folders import SKIP_DIRS, expand_roots, folder_kind, is_model_file
from sdtk.library.sidecars import read_sidecars, sidecar_signature, SIDECAR_SUFFIXES

EventCallback = Callable[[str, str], None]  # (event, path): new, changed, unchanged, missing, problem
ProgressCallback = Callable[[str, int, int], None]  # (path, bytes done, total)
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class ScanReport:
    roots: List[str] = field(default_factory=list)
    offline: List[str] = field(default_factory=list)  # folders not there whose files the library knows
    absent: List[str] = field(default_factory=list)  # folders not there that never held a known file
    seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    returned: int = 0  # missing before, present again
    missing: int = 0  # newly marked missing
    hashed: int = 0  # files read and hashed
    hashed_bytes: int = 0
    hashes_from_cache: int = 0  # new or changed files whose hashes the shared hash cache knew
    redescribed: int = 0  # described again from the header only (no re-hash)
    sidecars_reread: int = 0
    problems: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["problems"] = [{"path": p, "problem": m} for p, m in self.problems]
        return d


def _stems_index(names: List[str]) -> Dict[str, List[str]]:
    """stem -> names starting with `stem.` (every dot of every name is a possible stem end)."""
    index: Dict[str, List[str]] = {}
    for name in names:
        i = name.find(".", 1)
        while i != -1:
            index.setdefault(name[:i], []).append(name)
            i = name.find(".", i + 1)
    return index


def _sidecars_of(name: str, index: Dict[str, List[str]]) -> Dict[str, List[str]]:
    stem = os.path.splitext(name)[0]
    found: Dict[str, List[str]] = {}
    for other in index.get(stem, ()):
        if other == name:
            continue
        rest = other[len(stem):].lower()
        for suffix, role in SIDECAR_SUFFIXES:
            if rest == suffix:
                found.setdefault(role, []).append(other)
                break
    return found


def _walk(root: str, problems: List[Tuple[str, str]]):
    """Yield (folder, model DirEntry, sidecars) under root; follows folder symlinks once each."""
    stack = [root]
    visited = set()
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in visited:
                continue
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            problems.append((folder, f"cannot list folder: {e.strerror or e}"))
            continue
        index = _stems_index([e.name for e in entries])
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir():
                    if entry.name not in SKIP_DIRS and not entry.name.startswith("."):
                        subdirs.append(entry.path)
                elif is_model_file(entry.name) and entry.is_file():
                    yield folder, entry, _sidecars_of(entry.name, index)
            except OSError as e:
                problems.append((entry.path, f"cannot read: {e.strerror or e}"))
        stack.extend(sorted(subdirs, reverse=True))


def _under(root: str) -> Tuple[str, str]:
    """SQL range of paths below a folder: [root/, root0) ('0' follows '/')."""
    base = root.rstrip(os.sep) + os.sep
    return base, base[:-1] + chr(ord(os.sep) + 1)


def _read_config(folder: str, sidecars: Dict[str, List[str]]) -> Tuple[Optional[str], bool]:
    names = sidecars.get("config") or []
    if not names:
        return None, False
    try:
        with open(os.path.join(folder, names[0]), "r", encoding="utf-8", errors="replace") as fh:
            return fh.read(MAX_CONFIG_BYTES), True
    except OSError:
        return None, True


def _merged_columns(desc_meta: Dict[str, Any], side: Dict[str, Any]) -> Dict[str, Any]:
    """base_model and trained words: sidecars (Civitai's spelling) first, then the file's metadata."""
    words = list(side.get("trained_words") or [])
    low = {w.lower() for w in words}
    words += [w for w in desc_meta.get("trained_words") or [] if w.lower() not in low]
    return {"base_model": side.get("base_model") or desc_meta.get("base_model"),
            "trained_words": json.dumps(words, ensure_ascii=False) if words else None}


class Scanner:
    """One scan over some folders into one library connection."""

    def __init__(self, conn: sqlite3.Connection, *, content: bool = True, on_event: Optional[EventCallback] = None,
                 on_progress: Optional[ProgressCallback] = None):
        self.conn = conn
        self.content = content
        self.on_event = on_event or (lambda event, path: None)
        self.on_progress = on_progress
        self.report = ScanReport()
        self.now = time.time()

    # -- writing ---------------------------------------------------------------------------
    def _write(self, sql: str, rows: List[tuple]) -> None:
        if not rows:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(sql, rows)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _upsert(self, record: Dict[str, Any]) -> None:
        cols = list(record)
        sql = (f"INSERT INTO files ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
               f"ON CONFLICT(path) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols if c not in ('path', 'first_seen'))}")
        self._write(sql, [tuple(record[c] for c in cols)])

    # -- one file ----------------------------------------------------------------------------
    def _read_file(self, folder: str, path: str, st: os.stat_result, sidecars: Dict[str, List[str]]) -> Dict[str, Any]:
        """Hash and describe a new or changed file (one read of its bytes)."""
        from sdtk.formats import open_model

        record: Dict[str, Any] = {"problem": None, "format": None, "tensor_count": None, "parameters": None,
                                  "dtypes": None, "precision": None, "architecture": None, "kind": None, "ema": None,
                                  "title": None, "content_hash": None, **{c: None for c in PREDICTION_COLUMNS}}
        desc_meta: Dict[str, Any] = {}
        info: Dict[str, Any] = {}
        progress = (lambda done, total: self.on_progress(path, done, total)) if self.on_progress else None
        try:
            cat = open_model(path)
        except SdtkError as e:
            cat, record["problem"] = None, e.problem
        try:
            if cat is not None:
                config_text, has_config = _read_config(folder, sidecars)
                desc = describe_for_library(cat, config_text, has_config)
                desc_meta = {"base_model": desc.pop("base_model"), "trained_words": desc.pop("trained_words")}
                info = desc.pop("info")
                record.update(desc)
            # through the hash cache shared with `sdtk hash`, convert and merge: a file hashed
            # before by any of them (and unchanged) is not read again
            mh = cached_model_hashes(path, cat, content=self.content and cat is not None, on_progress=progress)
            fh = mh.file
            if cat is not None and self.content:
                record["content_hash"] = mh.content
        finally:
            if cat is not None:
                cat.close()
        if fh.size != st.st_size:
            raise SdtkError(path, "the file changed while it was being scanned")
        if mh.reads:
            self.report.hashed += 1
            self.report.hashed_bytes += fh.size
        else:
            self.report.hashes_from_cache += 1
        side = read_sidecars(folder, sidecars)
        info = {**info, "from_metadata": desc_meta, "sidecars": side}
        record.update({
            "sha256": fh.sha256, "autov1": fh.autov1_window[:8], "autov3": fh.autov3,
            "crc32": crc32_civitai_hex(fh.crc32), "blake3": fh.blake3, "hashed_at": time.time(),
            "describe_version": DESCRIBE_VERSION if cat is not None else None,
            "info": json.dumps(info, ensure_ascii=False, default=str),
            "sidecar_sig": sidecar_signature(folder, sidecars), **_merged_columns(desc_meta, side),
        })
        return record

    def _refresh(self, folder: str, path: str, row: sqlite3.Row, sidecars: Dict[str, List[str]], sig: str) -> Optional[Dict[str, Any]]:
        """For an unchanged file: re-read sidecars / re-describe from the header when needed."""
        redescribe = row["describe_version"] is not None and row["describe_version"] < DESCRIBE_VERSION
        redescribe = redescribe or (row["describe_version"] is None and row["problem"] is None)
        need_content = self.content and row["content_hash"] is None and row["problem"] is None
        if sig == (row["sidecar_sig"] or "") and not redescribe and not need_content:
            return None
        info = json.loads(row["info"] or "{}")
        desc_meta = info.get("from_metadata") or {}
        update: Dict[str, Any] = {}
        if redescribe or need_content:
            from sdtk.formats import open_model

            config_text, has_config = _read_config(folder, sidecars)
            try:
                with open_model(path) as cat:
                    desc = describe_for_library(cat, config_text, has_config)
                    if need_content:
                        update["content_hash"] = cached_hashes(path).get("content") or content_hash(cat)
                        remember_hashes(path, {"content": update["content_hash"]})
            except SdtkError as e:
                update["problem"] = e.problem
                desc = None
            if desc is not None:
                desc_meta = {"base_model": desc.pop("base_model"), "trained_words": desc.pop("trained_words")}
                info.update(desc.pop("info"))
                update.update(desc)
                update["describe_version"] = DESCRIBE_VERSION
            self.report.redescribed += 1
        side = info.get("sidecars") or {}
        if sig != (row["sidecar_sig"] or ""):
            side = read_sidecars(folder, sidecars)
            self.report.sidecars_reread += 1
        info.update({"from_metadata": desc_meta, "sidecars": side})
        update.update({"info": json.dumps(info, ensure_ascii=False, default=str), "sidecar_sig": sig,
                       **_merged_columns(desc_meta, side)})
        return update

    # -- one root ------------------------------------------------------------------------------
    def scan_root(self, root: str, kind_hint: Optional[str]) -> None:
        rep = self.report
        lo, hi = _under(root)
        if not os.path.isdir(root):
            known = self.conn.execute("SELECT 1 FROM files WHERE path >= ? AND path < ? LIMIT 1", (lo, hi)).fetchone()
            if not known:
                rep.absent.append(root)
                return
            rep.offline.append(root)
            self._write("UPDATE files SET status='missing' WHERE path >= ? AND path < ? AND status='present'", [(lo, hi)])
            rep.missing += self.conn.execute("SELECT changes()").fetchone()[0]
            self._write("INSERT INTO roots (path, folder_kind, last_scanned, online) VALUES (?, ?, ?, 0) "
                        "ON CONFLICT(path) DO UPDATE SET online=0", [(root, kind_hint, self.now)])
            return
        rep.roots.append(root)
        rows = {r["path"]: r for r in self.conn.execute(
            "SELECT path, size, mtime_ns, inode, status, problem, sidecar_sig, describe_version, sha256, content_hash, info "
            "FROM files WHERE path >= ? AND path < ?", (lo, hi))}
        seen = set()
        touched: List[tuple] = []
        for folder, entry, sidecars in _walk(root, rep.problems):
            path = os.path.normpath(entry.path)
            if path in seen:
                continue
            seen.add(path)
            try:
                st = entry.stat()
            except OSError as e:
                rep.problems.append((path, f"cannot read: {e.strerror or e}"))
                continue
            rep.seen += 1
            kind = folder_kind(path, root) or kind_hint
            row = rows.get(path)
            sig = sidecar_signature(folder, sidecars)
            if row is not None and row["sha256"] and (row["size"], row["mtime_ns"], row["inode"]) == (st.st_size, st.st_mtime_ns, st.st_ino):
                rep.unchanged += 1
                if row["status"] != "present":
                    rep.returned += 1
                self.on_event("unchanged", path)
                update = self._refresh(folder, path, row, sidecars, sig)
                if update:
                    self._upsert({"path": path, "root": root, "folder_kind": kind, "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev,
                                  "status": "present", "first_seen": self.now, "last_seen": self.now, **update})
                else:
                    touched.append((root, kind, self.now, path))
                continue
            event = "new" if row is None else "changed"
            self.on_event(event, path)
            try:
                record = self._read_file(folder, path, st, sidecars)
            except SdtkError as e:
                rep.problems.append((path, e.problem))
                self.on_event("problem", path)
                continue
            if row is None:
                rep.new += 1
            else:
                rep.changed += 1
                if row["status"] != "present":
                    rep.returned += 1
            self._upsert({"path": path, "root": root, "folder_kind": kind, "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev, "status": "present",
                          "first_seen": self.now, "last_seen": self.now, **record})
        self._write("UPDATE files SET status='present', root=?, folder_kind=?, last_seen=? WHERE path=?", touched)
        gone = [(p,) for p, r in rows.items() if p not in seen and r["status"] == "present" and not os.path.exists(p)]
        for (p,) in gone:
            self.on_event("missing", p)
        self._write("UPDATE files SET status='missing' WHERE path=? AND status='present'", gone)
        rep.missing += len(gone)
        self._write("INSERT INTO roots (path, folder_kind, last_scanned, online) VALUES (?, ?, ?, 1) "
                    "ON CONFLICT(path) DO UPDATE SET last_scanned=excluded.last_scanned, online=1", [(root, kind_hint, self.now)])


def scan_library(conn: sqlite3.Connection, paths, *, content: bool = True, on_event: Optional[EventCallback] = None,
                 on_progress: Optional[ProgressCallback] = None) -> ScanReport:
    """Scan folders (A1111/Forge, ComfyUI, `extra_model_paths.yaml`, plain) into the library."""
    start = time.perf_counter()
    scanner = Scanner(conn, content=content, on_event=on_event, on_progress=on_progress)
    for root, kind in expand_roots(paths):
        scanner.scan_root(root, kind)
    scanner.report.seconds = time.perf_counter() - start
    return scanner.report
