"""SHA-256 throughput on this CPU: hashlib (OpenSSL) vs sdtk's SHA-NI kernel, one stream and two
interleaved (`sdtk._sha2`, what a first conversion could use for SHA256 + AutoV3 in one pass), and
two hashlib threads (what it uses where pairing does not pay).

In memory (256 MiB of random bytes, no I/O); CPU seconds per pass (thread CPU time, so the
machine's load matters less than for wall time), median of `--repeat` rounds.
Writes bench/results/sha2.md.

    python bench/bench_sha2.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

from _measure import machine_facts  # noqa: E402

SIZE = 256 << 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "sha2.md"))
    args = ap.parse_args(argv)
    from sdtk.hashing import sha2pair

    data = memoryview(os.urandom(SIZE))
    rows = {"hashlib.sha256, one stream": [], "hashlib.sha256, two streams one after the other": [],
            "hashlib.sha256, two streams on two threads (wall)": []}
    if sha2pair.available():
        rows.update({"sdtk._sha2, one stream": [], "sdtk._sha2, two streams interleaved (one core)": []})
    for _ in range(args.repeat):
        t = time.thread_time()
        hashlib.sha256(data).digest()
        one = time.thread_time() - t
        rows["hashlib.sha256, one stream"].append(one)
        t = time.thread_time()
        hashlib.sha256(data).digest()
        hashlib.sha256(data[8:]).digest()
        rows["hashlib.sha256, two streams one after the other"].append(time.thread_time() - t)
        threads = [threading.Thread(target=lambda v=v: hashlib.sha256(v).digest()) for v in (data, data[8:])]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rows["hashlib.sha256, two streams on two threads (wall)"].append(time.perf_counter() - t)
        if sha2pair.available():
            t = time.thread_time()
            sha2pair.Sha256(data).digest()
            rows["sdtk._sha2, one stream"].append(time.thread_time() - t)
            a, b = sha2pair.Sha256(), sha2pair.Sha256()
            t = time.thread_time()
            sha2pair.update_pair(a, data, b, data[8:])
            a.digest(), b.digest()
            rows["sdtk._sha2, two streams interleaved (one core)"].append(time.thread_time() - t)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ref = med["hashlib.sha256, two streams one after the other"]
    lines = ["# SHA-256 throughput: hashlib vs the two-stream SHA-NI kernel", "",
             f"Run by `python bench/bench_sha2.py --repeat {args.repeat}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{SIZE >> 20} MiB in memory; median of {args.repeat} rounds; CPU seconds of the hashing thread unless marked wall.", "",
             "| variant | s | GB/s of input | two streams vs one after the other |", "|---|---:|---:|---:|"]
    for k, v in med.items():
        two = "two streams" in k
        lines.append(f"| {k} | {v:.3f} | {SIZE / v / 1e9:.2f} | {f'{ref / v:.2f}x' if two else ''} |")
    if sha2pair.available():
        lines += ["", f"`sha2pair.pair_gain()` (the quick check `filehash` uses to decide): {sha2pair.pair_gain():.2f}x; "
                  f"pairing is used from {sha2pair.PAIR_WORTH_IT}x: **{'yes' if sha2pair.worth_pairing() else 'no'}** on this CPU."]
    else:
        lines += ["", "sdtk._sha2 is not available here (not built, no SHA-NI, or SDTK_SHA2=off)."]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in machine_facts(str(HERE)).items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
