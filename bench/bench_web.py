"""Benchmark `sdtk serve` over a library of 30,000 indexed files: the first render of the library
page and searches, over HTTP against the real server (uvicorn, 127.0.0.1).

The library: a model tree of `--real` small files (LoRAs, every tenth with a Civitai sidecar and
a preview, in A1111/ComfyUI folders) scanned by `sdtk.library.scan_library`, then its rows cloned
in SQL to `--files` records (new paths, new hashes; two in every hundred share a hash, so the
duplicate filter has work). Measured: the first GET / after start (cold: templates compiled,
SQLite pages read), then the median of repeats; searches for a word that matches 300 files, one
that matches none (a full scan), a trigger word, and the problem / duplicate / kind filters.
Targets (issue 14): first render <= 1 s, a search <= 200 ms. Results: bench/results/web.md.

    python bench/bench_web.py
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]

from bench_library import make_tree  # noqa: E402
from _measure import machine_facts  # noqa: E402

CLONE_SQL = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :copies - 1)
INSERT INTO files (path, root, folder_kind, size, mtime_ns, inode, device, status, problem, first_seen, last_seen,
                   hashed_at, sha256, autov1, autov3, crc32, blake3, content_hash, format, tensor_count, parameters,
                   dtypes, precision, architecture, kind, ema, base_model, title, trained_words, info, sidecar_sig,
                   describe_version)
SELECT substr(path, 1, length(path) - 12) || printf('-c%05d', n.i) || '.safetensors', root, folder_kind, size + n.i,
       mtime_ns, inode + 1000000 + n.i, device, status, problem, first_seen, last_seen, hashed_at,
       CASE WHEN n.i % 100 IN (1, 2) THEN printf('%064x', f.id * 1000 + n.i / 100) ELSE lower(hex(randomblob(32))) END,
       autov1, autov3, crc32, blake3, lower(hex(randomblob(32))), format, tensor_count, parameters, dtypes, precision,
       architecture, kind, ema, base_model, title, trained_words, info, sidecar_sig, describe_version
FROM files f, n
"""


def build_library(base: Path, files: int = 30_000, real: int = 300) -> Path:
    """A library database of `files` records under base/models (see the module doc)."""
    from sdtk.library import open_library, scan_library

    make_tree(base, real)
    db = base / "lib.db"
    conn = open_library(db)
    scan_library(conn, [str(base / "models")], content=True)
    have = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    copies = max(0, (files - have + have - 1) // have)
    conn.execute("BEGIN")
    conn.execute(CLONE_SQL, {"copies": copies})
    conn.execute("COMMIT")
    extra = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] - files
    if extra > 0:
        conn.execute("DELETE FROM files WHERE id IN (SELECT id FROM files ORDER BY id DESC LIMIT ?)", (extra,))
    conn.execute("ANALYZE")
    conn.close()
    return db


QUERIES = [
    ("search: a name matching 1 in 30", "/library/rows?q=model_0001"),
    ("search: matching nothing (full scan)", "/library/rows?q=no-such-model-name"),
    ("search: a trigger word", "/library/rows?q=word10"),
    ("filter: kind = lora", "/library/rows?kind=lora"),
    ("filter: with problems", "/library/rows?problems=1"),
    ("filter: duplicates", "/library/rows?dupes=1"),
    ("sort: by size", "/library/rows?sort=size"),
]


def start_server(root: Path, db: Path):
    env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdtk", "serve", "--root", str(root), "--db", str(db), "--port", "0",
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("sdtk serve: http://"):
                return proc, line.split()[2].rstrip("/")
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the server did not start")


def timed(client, path: str) -> float:
    t = time.perf_counter()
    r = client.get(path)
    elapsed = time.perf_counter() - t
    assert r.status_code == 200, (path, r.status_code)
    return elapsed


def run(base: Path, files: int, repeat: int) -> dict:
    import httpx

    t = time.perf_counter()
    db = build_library(base, files)
    built = time.perf_counter() - t
    proc, url = start_server(base / "models", db)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            first = timed(client, "/")
            page = client.get("/").text
            assert f"{files:,} files" in page, "the library page does not show every file"
            warm = statistics.median(timed(client, "/") for _ in range(repeat))
            rows = []
            for name, q in QUERIES:
                times = [timed(client, q) for _ in range(repeat)]  # median and worst of the same runs
                rows.append((name, statistics.median(times), max(times)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    return {"files": files, "built_s": built, "first": first, "warm": warm, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=30_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "web.md"))
    ap.add_argument("--note", default="", help="e.g. 'loaded: other jobs running'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtk-bench-web-", dir=args.dir) as tmp:
        res = run(Path(tmp), args.files, args.repeat)
    facts = machine_facts()
    lines = [f"# sdtk serve: library of {res['files']:,} indexed files", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), "",
             f"Load average at the end: {os.getloadavg()[0]:.1f}. {args.note}".strip(), "",
             "| what | time | target |", "|---|---|---|",
             f"| first render of the library page (first GET / after start) | {res['first'] * 1000:.0f} ms | <= 1 s |",
             f"| library page again (median of {args.repeat}) | {res['warm'] * 1000:.0f} ms | |"]
    for name, med, worst in res["rows"]:
        lines.append(f"| {name} (median / worst of {args.repeat}) | {med * 1000:.0f} / {worst * 1000:.0f} ms | <= 200 ms |")
    lines += ["", f"Library built in {res['built_s']:.1f} s (scan of 300 files, rows cloned in SQL). "
                  "Times are whole HTTP requests from a client on the same machine (httpx), page rendered by the server.", ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
