"""The library as the web app reads it: one page of files at a time (search, filters, sort done by
SQLite over the `files` table, so 30,000 files cost one indexed query, not a Python loop), one
file by id, duplicate groups. Only files under the server's roots are ever returned."""
from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sdtk.library.query import find_dupes, record_json

PAGE_SIZE = 100
# sort key -> ORDER BY (every one ends in path, so pages are stable)
SORTS: Dict[str, str] = {
    "path": "path",
    "size": "size DESC, path",
    "size-asc": "size, path",
    "architecture": "COALESCE(architecture, '~'), path",
    "kind": "{kind}, path",
    "recent": "first_seen DESC, path",
}
# the kind as identified, or the folder's when identification said unknown (as record_json does)
KIND_SQL = "(CASE WHEN kind IS NULL OR kind = 'unknown' THEN COALESCE(folder_kind, kind) ELSE kind END)"
PROBLEM_SQL = "(problem IS NOT NULL OR json_extract(info, '$.identity.problems') IS NOT NULL)"
DUPES_SQL = ("(sha256 IN (SELECT sha256 FROM files WHERE status = 'present' AND sha256 IS NOT NULL "
             "GROUP BY sha256 HAVING COUNT(*) > 1) OR content_hash IN (SELECT content_hash FROM files "
             "WHERE status = 'present' AND content_hash IS NOT NULL GROUP BY content_hash HAVING COUNT(DISTINCT sha256) > 1))")
LIST_COLUMNS = ("id, path, size, status, kind, folder_kind, architecture, precision, base_model, title, "
                "trained_words, problem, sha256, format, info")


@dataclass
class Query:
    q: str = ""
    kind: str = ""
    architecture: str = ""
    problems: bool = False
    dupes: bool = False
    sort: str = "path"
    offset: int = 0
    limit: int = PAGE_SIZE

    @classmethod
    def from_params(cls, params) -> "Query":
        def integer(name, default, lo, hi):
            try:
                return max(lo, min(hi, int(params.get(name, default))))
            except (TypeError, ValueError):
                return default

        sort = params.get("sort") or "path"
        return cls(q=(params.get("q") or "").strip()[:200], kind=(params.get("kind") or "")[:64],
                   architecture=(params.get("architecture") or "")[:128],
                   problems=params.get("problems") in ("1", "on", "true"), dupes=params.get("dupes") in ("1", "on", "true"),
                   sort=sort if sort in SORTS else "path", offset=integer("offset", 0, 0, 10 ** 9),
                   limit=integer("limit", PAGE_SIZE, 1, 500))

    def params(self, **changes) -> Dict[str, Any]:
        d = {"q": self.q, "kind": self.kind, "architecture": self.architecture, "problems": "1" if self.problems else "",
             "dupes": "1" if self.dupes else "", "sort": self.sort, "offset": self.offset}
        d.update(changes)
        return {k: v for k, v in d.items() if v not in ("", None, 0) or k == "offset" and v}


def _like(value: str) -> str:
    return "%" + value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def under_roots(roots: Sequence[str]) -> Tuple[str, List[str]]:
    """SQL (and its arguments) for "the path lies under one of the roots" (range scans on the
    unique path index)."""
    parts, args = [], []
    for root in roots:
        base = root.rstrip(os.sep) + os.sep
        parts.append("(path >= ? AND path < ?)")
        args += [base, base[:-1] + chr(ord(os.sep) + 1)]
    return "(" + (" OR ".join(parts) or "0") + ")", args


def where_clause(query: Query, roots: Sequence[str]) -> Tuple[str, List[Any]]:
    root_sql, args = under_roots(roots)
    where = ["status = 'present'", root_sql]
    if query.q:
        pat = _like(query.q)
        where.append("(LOWER(path) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(title, '')) LIKE ? ESCAPE '\\' "
                     "OR LOWER(COALESCE(trained_words, '')) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(architecture, '')) LIKE ? ESCAPE '\\' "
                     "OR LOWER(COALESCE(base_model, '')) LIKE ? ESCAPE '\\' OR sha256 LIKE ?)")
        args += [pat] * 5 + [query.q.lower().strip() + "%" if len(query.q.strip()) >= 8 else "-"]
    if query.kind:
        where.append(f"{KIND_SQL} = ?")
        args.append(query.kind)
    if query.architecture:
        where.append("architecture = ?")
        args.append(query.architecture)
    if query.problems:
        where.append(PROBLEM_SQL)
    if query.dupes:
        where.append(DUPES_SQL)
    return " AND ".join(where), args


def page(conn: sqlite3.Connection, query: Query, roots: Sequence[str], index=None) -> Tuple[List[Dict[str, Any]], int]:
    """(one page of list rows, number of matching files): from the in-memory index
    (sdtk.web.index) when it is loaded, else by SQL."""
    if index is not None and index.ready.is_set():
        ids, total = index.search(query)
        by_id = {r["id"]: r for r in conn.execute(
            f"SELECT {LIST_COLUMNS} FROM files WHERE id IN ({','.join('?' * len(ids))})", ids)} if ids else {}
        rows = [by_id[i] for i in ids if i in by_id]
    else:
        where, args = where_clause(query, roots)
        total = conn.execute(f"SELECT COUNT(*) FROM files WHERE {where}", args).fetchone()[0]
        order = SORTS[query.sort].replace("{kind}", KIND_SQL)
        rows = conn.execute(f"SELECT {LIST_COLUMNS} FROM files WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                            args + [query.limit, query.offset]).fetchall()
    out = [list_row(r) for r in rows]
    for row in out:  # a thumbnail only when the first preview really is an image (16 bytes read)
        if row["has_preview"]:
            row["has_preview"] = _thumbnail_ok(row["path"], row["preview_names"][0], tuple(roots))
    return out, total


_THUMBS: Dict[tuple, bool] = {}


def _thumbnail_ok(model_path: str, name: str, roots: tuple) -> bool:
    """preview_file(...) for the list, remembered per (file, size, mtime): a page of 100 rows
    does not resolve and sniff 100 previews on every view."""
    from sdtk.web.previews import preview_file

    candidate = os.path.join(os.path.dirname(model_path), name)
    try:
        st = os.stat(candidate)
    except (OSError, ValueError):
        return False
    key = (candidate, st.st_size, st.st_mtime_ns, st.st_ino, roots)
    ok = _THUMBS.get(key)
    if ok is None:
        if len(_THUMBS) > 100_000:
            _THUMBS.clear()
        ok = _THUMBS[key] = preview_file(model_path, [name], 0, roots) is not None
    return ok


def list_row(r: sqlite3.Row) -> Dict[str, Any]:
    info = json.loads(r["info"] or "{}")
    side = info.get("sidecars") or {}
    identity = info.get("identity") or {}
    kind = r["kind"] if r["kind"] not in (None, "unknown") else (r["folder_kind"] or r["kind"])
    previews = (side.get("files") or {}).get("preview") or []
    return {
        "id": r["id"], "name": os.path.basename(r["path"]), "folder": os.path.dirname(r["path"]), "size": r["size"],
        "kind": kind, "architecture": r["architecture"], "precision": r["precision"], "base_model": r["base_model"],
        "title": r["title"] or (side.get("civitai") or {}).get("model_name"),
        "trained_words": json.loads(r["trained_words"]) if r["trained_words"] else [],
        "problem": r["problem"], "problems": identity.get("problems") or [], "format": r["format"],
        "autov2": (r["sha256"] or "")[:10].upper(), "has_preview": bool(previews), "preview_names": previews,
        "path": r["path"],
    }


def facets(conn: sqlite3.Connection, roots: Sequence[str]) -> Dict[str, List[str]]:
    """The kinds and architectures present, for the filter menus."""
    root_sql, args = under_roots(roots)
    kinds = [r[0] for r in conn.execute(f"SELECT DISTINCT {KIND_SQL} FROM files WHERE status = 'present' AND {root_sql} "
                                        f"AND {KIND_SQL} IS NOT NULL ORDER BY 1", args)]
    archs = [r[0] for r in conn.execute(f"SELECT DISTINCT architecture FROM files WHERE status = 'present' AND {root_sql} "
                                        "AND architecture IS NOT NULL ORDER BY 1", args)]
    return {"kinds": kinds, "architectures": archs}


def by_id(conn: sqlite3.Connection, file_id: int) -> Optional[sqlite3.Row]:
    return conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()


def record(row: sqlite3.Row) -> Dict[str, Any]:
    rec = record_json(row)
    rec["id"] = row["id"]
    return rec


def same_hash(conn: sqlite3.Connection, row: sqlite3.Row) -> List[sqlite3.Row]:
    """Other present files with the same SHA256 or the same weights (content hash)."""
    out = []
    if row["sha256"]:
        out += conn.execute("SELECT * FROM files WHERE sha256 = ? AND id != ? AND status = 'present' ORDER BY path",
                            (row["sha256"], row["id"])).fetchall()
    if row["content_hash"]:
        seen = {r["id"] for r in out}
        out += [r for r in conn.execute("SELECT * FROM files WHERE content_hash = ? AND id != ? AND status = 'present' ORDER BY path",
                                        (row["content_hash"], row["id"])) if r["id"] not in seen]
    return out


def dupe_groups(conn: sqlite3.Connection, roots: Sequence[str], cache: Optional[Dict] = None) -> Dict[str, Any]:
    """Duplicate groups (sdtk.library.query.find_dupes) restricted to the roots, with the
    reclaimable size: identical files beyond the first (hard links counted once); same weights in
    other files beyond the smallest; the same weights at another precision
    (sdtk.library.precision_dupes, values checked on a sample of tensors), beyond the smallest."""
    from sdtk.library.precision_dupes import precision_groups
    from sdtk.web.security import contained

    groups = find_dupes(conn)
    out: Dict[str, Any] = {"identical_files": [], "identical_weights": [], "reclaimable": 0, "precisions": []}
    for g in precision_groups(conn, lambda r: contained(r["path"], roots) is not None, cache):
        sizes = sorted(r["size"] for r in g["rows"])
        files = []
        for r in g["rows"]:
            rec = record(r)
            check = g["checks"].get(r["id"])
            rec["checked"] = (check.checked, check.total) if check else None
            files.append(rec)
        out["precisions"].append({"lead": g["lead"]["id"], "reclaimable": sum(sizes[1:]), "files": files})
    for g in groups["identical_files"]:
        rows = [r for r in g["rows"] if contained(r["path"], roots)]
        if len(rows) < 2:
            continue
        inodes = len({(r["device"], r["inode"]) for r in rows})
        reclaim = rows[0]["size"] * (inodes - 1)
        out["identical_files"].append({"sha256": g["SHA256"], "size": rows[0]["size"], "reclaimable": reclaim,
                                       "hard_links": inodes < len(rows), "files": [record(r) for r in rows]})
        out["reclaimable"] += reclaim
    for g in groups["identical_weights"]:
        rows = [r for r in g["rows"] if contained(r["path"], roots)]
        if len(rows) < 2:
            continue
        by_sha: Dict[str, sqlite3.Row] = {}
        for r in rows:
            by_sha.setdefault(r["sha256"], r)
        sizes = sorted(r["size"] for r in by_sha.values())
        reclaim = sum(sizes[1:])
        out["identical_weights"].append({"content": g["Content"], "reclaimable": reclaim, "files": [record(r) for r in rows]})
    return out


def other_copies(groups: Dict[str, Any], file_id: int) -> List[str]:
    """The other files of `file_id`'s duplicate groups (dupe_groups) still on disk: removing a
    duplicate needs one (two tabs removing both copies of a model must not leave none)."""
    out: List[str] = []
    for key in ("identical_files", "identical_weights", "precisions"):
        for g in groups[key]:
            if any(f["id"] == file_id for f in g["files"]):
                out += [f["path"] for f in g["files"] if f["id"] != file_id and os.path.isfile(f["path"])]
    return sorted(set(out))
