"""Throughput of sdtk's pickle interpreter (sdtk.formats.picklevm) beside CPython's pickle.load.

Large benign pickles both can read (plain values: no torch, no globals outside our allowlist):
  state-dict-like, protocol 2   200k string keys -> [int, float, str, (int, int)] in an OrderedDict
                                (the opcode mix of a checkpoint's data.pkl: BINUNICODE, BINPUT,
                                MARK, APPENDS, SETITEMS, small ints and tuples)
  floats, protocol 2            a list of 2M BINFLOATs in lists of 1000
  text lines, protocol 0        INT / FLOAT / STRING lines (one opcode per line), 8 MB
Each is interpreted from bytes and from an mmap of a file (the case that used to copy the rest
of the file per line for text opcodes), best of --repeat runs, in this process (CPU only).

Usage:  python bench/bench_picklevm.py [--repeat 3] [--scale 1.0] [--out bench/results/picklevm.md]
"""
from __future__ import annotations

import argparse
import collections
import mmap
import pickle
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from sdtk.formats.picklevm import PickleVM  # noqa: E402


def state_dict_like(scale: float) -> bytes:
    n = int(200_000 * scale)
    d = collections.OrderedDict((f"model.diffusion_model.input_blocks.{i}.0.weight", [i, 1.5, "cpu", (320, 4)]) for i in range(n))
    return pickle.dumps(d, protocol=2)


def floats(scale: float) -> bytes:
    n = int(2000 * scale)
    return pickle.dumps([[i * 0.5 + j for j in range(1000)] for i in range(n)], protocol=2)


def text_lines(scale: float) -> bytes:
    body = b"I12345\naF0.25\naS'cpu'\na" * int(8 * (1 << 20) * scale / 24)
    return b"(lp0\n" + body + b"."


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", default=str(BENCH / "results" / "picklevm.md"))
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdtk-bench-pvm-") as tmp:
        for label, make in (("state-dict-like, protocol 2", state_dict_like), ("floats, protocol 2", floats),
                            ("text lines, protocol 0", text_lines)):
            data = make(opts.scale)
            path = Path(tmp) / "p.pkl"
            path.write_bytes(data)
            t_pickle = best(lambda: pickle.loads(data), opts.repeat)
            t_vm = best(lambda: PickleVM(data).run(0), opts.repeat)
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                t_vm_mm = best(lambda: PickleVM(mm).run(0), opts.repeat)
                mm.close()
            mb = len(data) / (1 << 20)
            rows.append((label, mb, t_pickle, t_vm, t_vm_mm))
            print(f"{label:<30} {mb:7.1f} MB  pickle.load {t_pickle:6.3f} s ({mb / t_pickle:6.1f} MB/s)  "
                  f"sdtk VM {t_vm:6.3f} s ({mb / t_vm:5.1f} MB/s, {t_vm / t_pickle:4.1f}x)  from mmap {t_vm_mm:6.3f} s")
    try:
        from _measure import machine_facts

        facts = machine_facts(".")
    except Exception:  # pragma: no cover - facts are decoration
        facts = {}
    lines = ["# Pickle interpreter throughput (sdtk.formats.picklevm vs pickle.load)", "",
             "Produced by `python bench/bench_picklevm.py`" + (f" --scale {opts.scale}" if opts.scale != 1 else "") +
             f"; best of {opts.repeat}, in one process (CPU only).", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "| pickle | size | pickle.load | sdtk VM (bytes) | sdtk VM (mmap) | VM / pickle.load |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, mb, tp, tv, tm in rows:
        lines.append(f"| {label} | {mb:.1f} MB | {tp:.3f} s ({mb / tp:.0f} MB/s) | {tv:.3f} s ({mb / tv:.1f} MB/s) | "
                     f"{tm:.3f} s ({mb / tm:.1f} MB/s) | {tv / tp:.1f}x |")
    out = Path(opts.out)
    keep = ""
    if out.exists() and "## Analysis" in out.read_text():
        keep = "\n" + out.read_text()[out.read_text().index("## Analysis"):]
    out.write_text("\n".join(lines) + "\n" + keep)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
