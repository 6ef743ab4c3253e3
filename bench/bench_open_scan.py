"""Opening and scanning a full-size SD 1.5 checkpoint (.ckpt, 7.7 GB, 1831 tensors).

Side by side, in one run, on the same file:
  sdtk open (cold)   `open_model(IN)`: the catalogue (names, dtypes, shapes, spans) after the
                     file's pages were dropped from the page cache (posix_fadvise DONTNEED)
  sdtk open (warm)   the same with the file's directory and pickle in the page cache
  torch mmap load    `torch.load(IN, mmap=True, weights_only=True)` (the lightest torch way to
                     get at the tensors without reading them), warm
  sdtk scan          `scan_file(IN)`: every pickle interpreted, every record's CRC-32 verified
Each is measured with bench/_measure.py in a fresh interpreter (wall time, peak anonymous RSS,
peak file RSS).

Input: the real `sd15-full-ema` layout as a Lightning-style checkpoint written by
sdtk.formats.torchzip_write, zero-filled and sparse (a few MB of disk): opening never reads
tensor data, so zeros change nothing there; for `scan` the CRC runs over zeros read from holes,
so its time is CPU (zlib) time, not disk time.

Usage:  python bench/bench_open_scan.py [--dir DIR] [--repeat 3] [--no-torch]
Writes bench/results/open_scan.md and deletes its file at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(BENCH))

from _measure import MB, machine_facts, measure_python  # noqa: E402

LAYOUT = "sd15-full-ema"


def drop_file_cache(path: str) -> None:
    """Evict the file's pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def open_catalogue(path: str, cold: str = "0") -> int:
    """Measured in a fresh interpreter: time open_model only (imports excluded), print it."""
    from sdtk.formats import open_model

    if cold == "1":
        drop_file_cache(path)
    start = time.perf_counter()
    with open_model(path) as cat:
        count = len(cat)
    print(f"INNER {time.perf_counter() - start:.3f} ({count} tensors)", file=sys.stderr)
    return 0


def torch_mmap_load(path: str) -> int:
    import torch

    start = time.perf_counter()
    sd = torch.load(path, mmap=True, weights_only=True)
    print(f"INNER {time.perf_counter() - start:.3f} ({len(sd['state_dict'])} tensors)", file=sys.stderr)
    return 0


def scan(path: str) -> int:
    from sdtk.scan import scan_file

    start = time.perf_counter()
    result = scan_file(path)
    print(f"INNER {time.perf_counter() - start:.3f} ({result.verdict})", file=sys.stderr)
    return 0 if result.verdict == "safe" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=str(BENCH / "results" / "open_scan.md"))
    args = parser.parse_args()

    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.samples import layout_plan, load_layout

    path = os.path.join(args.dir, f"sdtk-bench-{LAYOUT}.ckpt")
    try:
        write_torch_zip(path, layout_plan(load_layout(LAYOUT)), wrap="state_dict", sparse_zeros=True, overwrite=True)
        size = os.path.getsize(path)
        rows = []
        runs = [("sdtk open (cold)", "bench_open_scan:open_catalogue", [path, "1"]),
                ("sdtk open (warm)", "bench_open_scan:open_catalogue", [path, "0"])]
        if not args.no_torch:
            runs.append(("torch.load(mmap=True, weights_only=True)", "bench_open_scan:torch_mmap_load", [path]))
        runs.append(("sdtk scan (all CRCs)", "bench_open_scan:scan", [path]))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(BENCH)]))
        for label, target, targs in runs:
            results = [measure_python(target, targs, label=label, env=env) for _ in range(args.repeat)]
            best = min(results, key=lambda m: m.wall_s)
            rows.append((label, best, results))
            print(best.summary(), flush=True)
        write_report(args.out, path, size, rows)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return 0


def _inner(m) -> str:
    for line in m.stderr_tail.splitlines():
        if line.startswith("INNER "):
            return line.split()[1]
    return f"failed (exit {m.returncode})"


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def write_report(out: str, path: str, size: int, rows) -> None:
    facts = machine_facts(os.path.dirname(path))
    lines = [
        "# Opening and scanning a 7.7 GB .ckpt (bench/bench_open_scan.py)", "",
        f"Input: `{LAYOUT}` layout as a Lightning checkpoint, {size / 1e9:.2f} GB, sparse zero-filled "
        "(written by sdtk.formats.torchzip_write). 'The operation alone' is timed inside the process "
        "(imports excluded); 'whole process' includes interpreter start and imports. Peak RSS from "
        "bench/_measure.py (anonymous = allocated; file = mapped file pages).", "",
        "| what | the operation alone, best (s) | whole process, best (s) | all runs, operation (s) | peak anon RSS (MB) | peak file RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for label, best, results in rows:
        inner = [_inner(m) for m in results]
        runs = ", ".join(inner)
        lines.append(f"| {label} | {min(inner, key=_seconds)} | {best.wall_s:.2f} | {runs} | "
                     f"{best.peak_rss_anon / MB:.0f} | {best.peak_rss_file / MB:.0f} |")
    load = os.getloadavg()
    lines += ["", f"Load average when the report was written: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              "(1/5/15 min; the machine is shared, figures above 1.0 per core inflate every time above).",
              "", "Machine:", ""] + [f"- {k}: {v}" for k, v in facts.items()] + [""]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
