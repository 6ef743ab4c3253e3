"""Benchmark `sdtk hash`: all six hashes in one read vs. hashlib.sha256 alone vs. the six one after another.

A full-size SD 1.5 (EMA-only) fp16 safetensors file (~2.1 GB, real layout, random bytes) is made
in a temporary folder, read once to warm the page cache, and every variant runs in a fresh
interpreter (through `_measure.py`: peak anonymous RSS), interleaved, `--repeat` times; the median
of the in-process times is reported (interpreter start and imports excluded). A second, smaller
file shows that peak memory does not depend on the file's size. Results: bench/results/hash.md.

    python bench/bench_hash.py                 # ~2.2 GB of disk, a few minutes
    python bench/bench_hash.py --size-scale 8  # smoke run (figures mean nothing)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]

from _measure import MB, machine_facts, measure_python  # noqa: E402

CHUNK = 16 * 1024 * 1024
NOTE_GIL = """GIL note (measured on this machine, blake3 1.0.11, isal 1.9.1): hashlib's sha256 and zlib.crc32 release the
GIL on large buffers, but blake3.update and isal_zlib.crc32 hold it for a whole buffer (two threads of either take
twice as long as one). Their share is small (~0.3 and ~0.15 s per GB), so the two sha256 passes still overlap, but
under load the interpreter's GIL hand-over (5 ms switch interval) costs more: compare the wall ratio with the
busiest-thread CPU ratio above."""


def _report(t0: float, **extra) -> None:
    print(json.dumps({"seconds": time.perf_counter() - t0, **extra}), file=sys.stderr)


def _passes(path: str, *updaters) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            for update in updaters:
                update(view[:n])


# ---- variants, each run in its own interpreter -----------------------------------------------

def run_sha256(path: str) -> int:
    """hashlib.sha256 alone over the file (the reference: one sha256 pass)."""
    import hashlib

    t0 = time.perf_counter()
    c0 = time.thread_time()
    h = hashlib.sha256()
    _passes(path, h.update)
    _report(t0, sha256=h.hexdigest(), cpu_s=time.thread_time() - c0)
    return 0


def run_sdtk(path: str, blake3_threads: str = "1") -> int:
    """sdtk: all six in one read (reader + 2 workers)."""
    from sdtk.hashing import HashOptions, hash_file

    t0 = time.perf_counter()
    stats = {}
    h = hash_file(path, options=HashOptions(blake3_threads=int(blake3_threads)), stats=stats)
    _report(t0, sha256=h.sha256, **stats)
    return 0


def run_sdtk_content(path: str) -> int:
    """sdtk: six hashes + the content hash (one sha256 per tensor) in the same read."""
    from sdtk.hashing.model import hash_model_file

    t0 = time.perf_counter()
    m = hash_model_file(path)
    _report(t0, sha256=m.file.sha256, reads=m.reads)
    return 0


def run_sequential(path: str, crc: str = "zlib") -> int:
    """The six one after another, one read each (what a naive tool does; AutoV1 is a 64 KiB read)."""
    import hashlib
    import struct

    import blake3

    if crc == "zlib":
        from zlib import crc32
    else:
        from isal.isal_zlib import crc32
    t0 = time.perf_counter()
    sha = hashlib.sha256()
    _passes(path, sha.update)
    with open(path, "rb") as f:
        f.seek(0x100000)
        autov1 = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n if n < 16 * 1024 * 1024 else 8)
        v3 = hashlib.sha256()
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            v3.update(b)
    state = [0]
    _passes(path, lambda v: state.__setitem__(0, crc32(v, state[0])))
    b3 = blake3.blake3()
    _passes(path, b3.update)
    _report(t0, sha256=sha.hexdigest(), autov1=autov1)
    return 0


def run_sha256sum(path: str) -> int:
    """coreutils sha256sum (what many users run by hand)."""
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", path], check=True, stdout=subprocess.DEVNULL)
    _report(t0)
    return 0


# ---- driver ----------------------------------------------------------------------------------

def make_model(path: Path, scale: int) -> int:
    """A full-size (scale 1) SD 1.5 EMA-only fp16 safetensors of random bytes."""
    import numpy as np

    from sdtk.formats.safetensors import build_header
    from sdtk.samples import layout_plan, load_layout

    plan = layout_plan(load_layout("sd15-emaonly").with_dtype("float16"), scale=scale if scale > 1 else None)
    header = build_header(plan)
    total = sum(t.nbytes for t in plan)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(header)
        left = total
        while left:
            n = min(left, 64 * MB)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    return len(header) + total


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MB):
            pass


VARIANTS = [
    ("sha256", "hashlib.sha256 alone (1 pass)", "run_sha256", ()),
    ("sdtk", "sdtk: six hashes, one read", "run_sdtk", ()),
    ("sdtk_content", "sdtk: six hashes + content hash, one read", "run_sdtk_content", ()),
    ("sdtk_b3mt", "sdtk, blake3 max_threads=2", "run_sdtk", ("2",)),
    ("seq_zlib", "six one after another (zlib crc32)", "run_sequential", ("zlib",)),
    ("seq_isal", "six one after another (isal crc32)", "run_sequential", ("isal",)),
    ("sha256sum", "coreutils sha256sum (1 pass)", "run_sha256sum", ()),
]


def run_variant(func: str, args, path: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(SRC)]))
    m = measure_python(f"bench_hash:{func}", [str(path), *args], env=env)
    if not m.ok:
        raise SystemExit(f"{func} failed: {m.stderr_tail}")
    result = json.loads(m.stderr_tail.strip().splitlines()[-1])
    m.result = result
    return result["seconds"], m


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the temporary files on kill too
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="folder for the temporary files (default: a new one under /tmp)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size-scale", type=int, default=1, help="divide tensor dims (smoke runs)")
    ap.add_argument("--out", default=str(HERE / "results" / "hash.md"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdtk-bench-hash-", dir=args.dir))
    try:
        big = work / "sd15-emaonly-fp16.safetensors"
        size = make_model(big, args.size_scale)
        small = work / "sd15-emaonly-fp16-scale2.safetensors"
        small_size = make_model(small, args.size_scale * 2)
        warm(big)
        warm(small)
        times = {key: [] for key, *_ in VARIANTS}
        meas = {}
        for _ in range(args.repeat):
            for key, _, func, fargs in VARIANTS:
                seconds, m = run_variant(func, fargs, big)
                times[key].append(seconds)
                meas.setdefault(key, []).append(m)
                print(f"{key}: {seconds:.2f} s, peak anon {m.peak_rss_anon / MB:.0f} MB", flush=True)
        _, m_small = run_variant("run_sdtk", (), small)
        med = {k: min(v) for k, v in times.items()}  # best of N: the machine is shared, noise only adds
        base = med["sha256"]
        lines = [
            "# `sdtk hash`: six hashes in one read",
            "",
            f"File: SD 1.5 EMA-only fp16 safetensors, real layout, random bytes, {size:,} bytes, in the page cache.",
            f"Best of {args.repeat} runs each, interleaved (the machine is shared; load only adds time); time measured inside a fresh interpreter (start-up and imports excluded);",
            "peak anonymous RSS sampled by bench/_measure.py over the whole process.",
            "",
            "| variant | time (s) | GB/s | x sha256 alone | CPU s (user+sys) | peak anon RSS |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, label, *_ in VARIANTS:
            peak = max(m.peak_rss_anon for m in meas[key])
            cpu = min(m.user_s + m.sys_s for m in meas[key])
            lines.append(f"| {label} | {med[key]:.2f} | {size / med[key] / 1e9:.2f} | {med[key] / base:.2f} | {cpu:.2f} | {peak / MB:.0f} MB |")
        sha_cpu = min(m.result["cpu_s"] for m in meas["sha256"])
        best = min(meas["sdtk"], key=lambda m: max(m.result["worker_cpu_s"]))
        workers = best.result["worker_cpu_s"]
        lines += [
            "",
            "CPU seconds by thread (load-independent; on two otherwise idle cores the wall time is about the busiest thread's):",
            f"sha256 alone {sha_cpu:.2f} s; sdtk worker 1 (SHA256 + CRC32) {workers[0]:.2f} s, worker 2 (AutoV3 + BLAKE3) "
            f"{workers[1]:.2f} s, reader {best.result['reader_cpu_s']:.2f} s: busiest thread / sha256 alone = "
            f"**{max(workers) / sha_cpu:.2f}x** (sum of all threads {sum(workers) + best.result['reader_cpu_s']:.2f} s, "
            f"{(sum(workers) + best.result['reader_cpu_s']) / sha_cpu:.2f}x).",
            "",
            f"Peak anonymous RSS of `sdtk` on a file half the size ({small_size:,} bytes): {m_small.peak_rss_anon / MB:.0f} MB "
            f"(full size: {max(m.peak_rss_anon for m in meas['sdtk']) / MB:.0f} MB): the buffer pool (4 x 16 MiB), not the file, sets it.",
            "",
            f"Target: sdtk six hashes <= 1.35x sha256 alone: **{med['sdtk'] / base:.2f}x** "
            f"({'met' if med['sdtk'] / base <= 1.35 else 'NOT met'}). One after another: {med['seq_zlib'] / base:.2f}x (zlib CRC32).",
            "",
            *NOTE_GIL.splitlines(),
            "",
            f"Load average when the run ended: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work on the machine slows every variant,",
            "the two-thread one most: it needs both cores at once). CPU s includes interpreter start-up and imports.",
            "",
            "## Machine",
            "",
        ]
        lines += [f"- {k}: {v}" for k, v in machine_facts(str(work)).items()]
        lines += ["", f"Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python bench/bench_hash.py`."]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
