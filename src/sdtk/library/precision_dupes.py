"""The same model at another precision: an fp16 (bf16, fp8) file that is a plain cast of an fp32
one holds the same weights, yet its bytes and content hash differ, so `find_dupes` cannot see it.

- Candidates come from the library alone (no file read): same kind, architecture, tensor count and
  parameter count (counts do not depend on the dtype), more than one precision.
- Two independent fine-tunes of one architecture are candidates too, so a candidate is only
  called a duplicate after its values are checked: every tensor of one file must equal the other
  file's tensor cast to its dtype (`sdtk.ops.cast.cast_array`, the cast `sdtk convert --dtype`
  does, bit-identical to torch's `.to()`), and tensors of the same dtype must be byte-identical.
  The duplicates page checks `SAMPLE` tensors spread over the key order; `same_weights(...,
  sample=None)` checks every tensor (a job, with progress).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

SAMPLE = 6


@dataclass(frozen=True)
class Check:
    same: bool
    checked: int  # tensors compared
    total: int  # tensors in the file
    reason: str  # why not (empty when same)


def candidate_groups(conn: sqlite3.Connection) -> List[List[sqlite3.Row]]:
    """Rows of present files with the same kind, architecture, tensor and parameter counts and more
    than one precision (widest first: the largest file of a group leads it)."""
    groups = []
    for g in conn.execute(
            "SELECT kind, architecture, tensor_count, parameters FROM files WHERE status = 'present' "
            "AND parameters IS NOT NULL AND tensor_count IS NOT NULL AND architecture IS NOT NULL AND problem IS NULL "
            "GROUP BY kind, architecture, tensor_count, parameters HAVING COUNT(DISTINCT precision) > 1"):
        rows = conn.execute("SELECT * FROM files WHERE status = 'present' AND problem IS NULL AND kind = ? AND architecture = ? "
                            "AND tensor_count = ? AND parameters = ? ORDER BY size DESC, path", tuple(g)).fetchall()
        groups.append(rows)
    return groups


def _spread(keys: List[str], n: Optional[int]) -> List[str]:
    if n is None or len(keys) <= n:
        return keys
    return [keys[round(i * (len(keys) - 1) / (n - 1))] for i in range(n)]


def same_weights(path_a: str, path_b: str, sample: Optional[int] = SAMPLE,
                 on_tensor: Optional[Callable[[int, int], None]] = None) -> Check:
    """Whether `path_b` holds `path_a`'s weights at another precision (or the same). Reads
    `sample` tensors of each (None: all), one at a time."""
    import numpy as np

    from sdtk.formats import open_model
    from sdtk.ops.cast import cast_array

    with open_model(path_a) as ca, open_model(path_b) as cb:
        ta, tb = ca.tensors, cb.tensors
        if set(ta) != set(tb):
            return Check(False, 0, len(ta), "the tensor names differ")
        keys = sorted(ta)
        for k in keys:
            if tuple(ta[k].shape) != tuple(tb[k].shape):
                return Check(False, 0, len(keys), f"{k}: the shapes differ")
        if all(ta[k].dtype == tb[k].dtype for k in keys):
            return Check(False, 0, len(keys), "the same precision: compare their content hashes instead")
        chosen = _spread(keys, sample)
        for i, k in enumerate(chosen):
            a, b = ta[k], tb[k]
            x, y = np.asarray(a.read()), np.asarray(b.read())
            if a.dtype != b.dtype:
                if not (a.dtype.is_float and b.dtype.is_float):
                    return Check(False, i + 1, len(keys), f"{k}: {a.dtype.short} and {b.dtype.short}")
                wide, narrow, target = (x, y, b.dtype) if a.dtype.itemsize >= b.dtype.itemsize else (y, x, a.dtype)
                if a.dtype.itemsize == b.dtype.itemsize:  # fp16 and bf16: neither is a cast of the other
                    return Check(False, i + 1, len(keys), f"{k}: {a.dtype.short} and {b.dtype.short} are not casts of each other")
                x, y = cast_array(np.ascontiguousarray(wide), target)[0], narrow
            if x.tobytes() != np.ascontiguousarray(y).tobytes():
                return Check(False, i + 1, len(keys), f"{k}: other values")
            if on_tensor is not None:
                on_tensor(i + 1, len(chosen))
        return Check(True, len(chosen), len(keys), "")


def precision_groups(conn: sqlite3.Connection, keep: Callable[[sqlite3.Row], bool],
                     cache: Optional[Dict] = None, limit: int = 50) -> List[Dict]:
    """Groups of files whose sampled tensors are casts of the group's widest file:
    [{"lead": row, "rows": [lead, match...], "checks": {id: Check}}]. `keep(row)`: the rows to
    consider (e.g. inside the served roots); `cache`: results by the two files' (path, size,
    mtime) so a page shows them again without reading."""
    out, pairs = [], 0
    for rows in candidate_groups(conn):
        rows = [r for r in rows if keep(r)]
        if len(rows) < 2:
            continue
        lead, matches, checks = rows[0], [], {}
        for r in rows[1:]:
            if r["precision"] == lead["precision"] or pairs >= limit:
                continue
            pairs += 1
            key = ((lead["path"], lead["size"], lead["mtime_ns"]), (r["path"], r["size"], r["mtime_ns"]))
            check = cache.get(key) if cache is not None else None
            if check is None:
                try:
                    check = same_weights(lead["path"], r["path"])
                except Exception as e:  # an unreadable file is no duplicate; the page says nothing more
                    check = Check(False, 0, 0, f"{type(e).__name__}")
                if cache is not None:
                    cache[key] = check
            if check.same:
                matches.append(r)
                checks[r["id"]] = check
        if matches:
            out.append({"lead": lead, "rows": [lead] + matches, "checks": checks})
    return out
