"""Reading the library: list with filters, show one file, find by any hash, duplicates."""
from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from sdtk.errors import UsageError
from sdtk.hashing.styles import CIVITAI_AUTOV1_MIN_SIZE, CIVITAI_AUTOV3_DIGITS

# hash column -> the name users know it by (Civitai's), and how many hex digits Civitai shows
HASH_COLUMNS = {
    "sha256": "SHA256",  # AutoV2 is its first 10 digits
    "autov1": "AutoV1",
    "autov3": "AutoV3",
    "crc32": "CRC32",
    "blake3": "BLAKE3",
    "content_hash": "Content",
}
MIN_PREFIX = 4


@dataclass
class Filters:
    architecture: Optional[str] = None  # substring, case-insensitive
    kind: Optional[str] = None
    precision: Optional[str] = None
    ema: Optional[bool] = None
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    name: Optional[str] = None  # substring of file name or title
    base_model: Optional[str] = None
    trained_word: Optional[str] = None
    include_missing: bool = False


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GB', '123' (bytes) -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text or "")
    if not m:
        raise UsageError(None, f"size {text!r} is not a size (examples: 500M, 2G, 1.5GB)")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def record_json(row: sqlite3.Row) -> Dict[str, Any]:
    """One file's record as JSON (schema in docs/library.md)."""
    d = dict(row)
    size = d["size"]
    sha = d.get("sha256")
    hashes = None
    if sha:
        hashes = {
            "SHA256": sha.upper(), "AutoV1": d["autov1"].upper() if d.get("autov1") and size >= CIVITAI_AUTOV1_MIN_SIZE else None,
            "AutoV2": sha[:10].upper(), "AutoV3": (d.get("autov3") or "")[:CIVITAI_AUTOV3_DIGITS].upper() or None,
            "CRC32": (d.get("crc32") or "").upper() or None, "BLAKE3": (d.get("blake3") or "").upper() or None,
            "Content": (d.get("content_hash") or "").upper() or None,
        }
    info = json.loads(d.get("info") or "{}")
    return {
        "path": d["path"], "name": os.path.basename(d["path"]), "status": d["status"], "size": size,
        "folder_kind": d.get("folder_kind"), "format": d.get("format"),
        "kind": d.get("kind") if d.get("kind") not in (None, "unknown") else (d.get("folder_kind") or d.get("kind")),
        "architecture": d.get("architecture"), "precision": d.get("precision"),
        "ema": None if d.get("ema") is None else bool(d["ema"]), "base_model": d.get("base_model"), "title": d.get("title"),
        "tensor_count": d.get("tensor_count"), "parameters": d.get("parameters"),
        "dtypes": json.loads(d["dtypes"]) if d.get("dtypes") else None,
        "trained_words": json.loads(d["trained_words"]) if d.get("trained_words") else [],
        "prediction": _prediction(d, info),
        "hashes": hashes, "hashes_a1111": _a1111(d) if sha else None,
        "problem": d.get("problem"), "root": d.get("root"),
        "first_seen": d.get("first_seen"), "last_seen": d.get("last_seen"), "hashed_at": d.get("hashed_at"),
        "info": info,
    }


def _prediction(d: Dict[str, Any], info: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """{"type", "confidence", "source", "zero_terminal_snr", "evidence"}: what identify said and how
    sure it was (sdtk.identify.prediction). Confidence and source are null for a file described
    before the library recorded them (schema < 3) until the next scan."""
    if d.get("prediction") is None and d.get("prediction_confidence") is None:
        return None
    identity = info.get("identity") or {}
    return {"type": d.get("prediction"), "confidence": d.get("prediction_confidence"), "source": d.get("prediction_source"),
            "zero_terminal_snr": None if d.get("zero_terminal_snr") is None else bool(d["zero_terminal_snr"]),
            "evidence": identity.get("prediction_evidence") or []}


def prediction_line(pred: Optional[Dict[str, Any]]) -> Optional[str]:
    """`v (high confidence, from marker), zero terminal SNR`; None when nothing is recorded."""
    if not pred:
        return None
    if pred["confidence"] is None:
        return f"{pred['type']} (confidence not recorded: run `sdtk library scan` again)"
    if pred["type"] is None:
        return "unknown (no evidence)"
    line = f"{pred['type']} ({pred['confidence']} confidence, from {pred['source']})"
    return line + (", zero terminal SNR" if pred.get("zero_terminal_snr") else "")


def _a1111(d: Dict[str, Any]) -> Dict[str, Optional[str]]:
    return {"SHA256": d["sha256"], "AutoV1": d.get("autov1"), "AutoV2": d["sha256"][:10], "AutoV3": d.get("autov3"),
            "CRC32": d.get("crc32"), "BLAKE3": d.get("blake3")}


def list_files(conn: sqlite3.Connection, f: Filters) -> List[sqlite3.Row]:
    where, args = [], []

    def like(column_sql: str, value: Optional[str]) -> None:
        if value:
            where.append(f"LOWER(COALESCE({column_sql}, '')) LIKE ? ESCAPE '\\'")
            args.append("%" + value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")

    if not f.include_missing:
        where.append("status = 'present'")
    like("architecture", f.architecture)
    if f.kind:  # as identified, or as the folder layout says (a LoRA in models/loras)
        where.append("(LOWER(COALESCE(kind, '')) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(folder_kind, '')) LIKE ? ESCAPE '\\')")
        pat = "%" + f.kind.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [pat, pat]
    like("precision", f.precision)
    like("base_model", f.base_model)
    like("trained_words", f.trained_word)
    if f.name:
        where.append("(LOWER(path) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(title, '')) LIKE ? ESCAPE '\\')")
        pat = "%" + f.name.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [pat, pat]
    if f.ema is not None:
        where.append("ema = ?")
        args.append(1 if f.ema else 0)
    if f.min_size is not None:
        where.append("size >= ?")
        args.append(f.min_size)
    if f.max_size is not None:
        where.append("size <= ?")
        args.append(f.max_size)
    sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY path"
    return conn.execute(sql, args).fetchall()


def show_file(conn: sqlite3.Connection, target: str) -> List[sqlite3.Row]:
    """Records for a path (as given, absolute, or real), else for a file name."""
    candidates = {os.path.normpath(os.path.abspath(target)), os.path.realpath(target), target}
    rows = conn.execute(f"SELECT * FROM files WHERE path IN ({','.join('?' for _ in candidates)})", list(candidates)).fetchall()
    if rows:
        return rows
    base = os.path.basename(target)
    return [r for r in conn.execute("SELECT * FROM files WHERE path LIKE ? ESCAPE '\\' ORDER BY path",
                                    ("%" + base.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),))
            if os.path.basename(r["path"]) == base]


def normalise_hash(text: str) -> str:
    h = text.strip().lower()
    if h.startswith("0x"):
        h = h[2:]
    if not re.fullmatch(r"[0-9a-f]+", h or "-"):
        raise UsageError(None, f"{text!r} is not a hash (hex digits, any case, prefixes of {MIN_PREFIX}+ digits accepted)")
    if len(h) < MIN_PREFIX:
        raise UsageError(None, f"hash prefix {text!r} is too short (at least {MIN_PREFIX} hex digits)")
    return h


def find_hash(conn: sqlite3.Connection, text: str) -> List[Dict[str, Any]]:
    """Files any of whose hashes (SHA256/AutoV2, AutoV1, AutoV3, CRC32, BLAKE3, content) starts with `text`."""
    h = normalise_hash(text)
    out, seen = [], {}
    for column, label in HASH_COLUMNS.items():
        rows = conn.execute(f"SELECT * FROM files WHERE {column} >= ? AND {column} < ? ORDER BY path", (h, h + "g")).fetchall()
        for r in rows:
            if label == "SHA256" and len(h) <= 10:
                label_here = "AutoV2" if len(h) == 10 else "SHA256"
            else:
                label_here = label
            if r["path"] in seen:
                seen[r["path"]]["matched"].append(label_here)
                continue
            rec = {"matched": [label_here], "record": r}
            seen[r["path"]] = rec
            out.append(rec)
    return out


def find_dupes(conn: sqlite3.Connection, include_missing: bool = False) -> Dict[str, List[Dict[str, Any]]]:
    """{"identical_files": groups by SHA256, "identical_weights": groups by content hash whose
    files differ (another container, other metadata)}; each group lists its records."""
    status = "" if include_missing else "AND status = 'present'"
    files = []
    for (sha,) in conn.execute(f"SELECT sha256 FROM files WHERE sha256 IS NOT NULL {status} GROUP BY sha256 HAVING COUNT(*) > 1 ORDER BY sha256"):
        rows = conn.execute(f"SELECT * FROM files WHERE sha256 = ? {status} ORDER BY path", (sha,)).fetchall()
        same_inode = len({(r["device"], r["inode"]) for r in rows}) < len(rows)
        files.append({"SHA256": sha.upper(), "size": rows[0]["size"], "rows": rows, "hard_links": same_inode,
                      "reclaimable": rows[0]["size"] * (len({(r['device'], r['inode']) for r in rows}) - 1)})
    weights = []
    for (content,) in conn.execute(f"SELECT content_hash FROM files WHERE content_hash IS NOT NULL {status} GROUP BY content_hash "
                                   "HAVING COUNT(DISTINCT sha256) > 1 ORDER BY content_hash"):
        rows = conn.execute(f"SELECT * FROM files WHERE content_hash = ? {status} ORDER BY path", (content,)).fetchall()
        weights.append({"Content": content.upper(), "rows": rows})
    return {"identical_files": files, "identical_weights": weights}
