"""Measure a command the same way in every benchmark: wall time and peak memory, split into
anonymous memory (what a program allocates: the figure our streaming targets are about) and file
pages (mmap'd or cached file data the kernel can drop at will).

A command (argv list) or a Python function (`"module:function"`, run in a fresh interpreter so
nothing of the benchmark driver is counted) runs in a subprocess. While it runs, /proc/<pid>/status
of the process and of all its descendants is sampled every `interval` seconds:
- peak_rss_anon: the highest sum of RssAnon over the process tree (anonymous resident memory);
- peak_rss_file: the highest sum of RssFile (file-backed resident pages, e.g. an mmap'd model);
- vm_hwm: the highest VmHWM (the kernel's own peak-RSS counter, anon + file) of any process;
- max_rss: ru_maxrss of the waited-for children (the kernel's peak RSS, never missed by sampling).
Sampling can miss a spike shorter than `interval`; VmHWM and max_rss cannot, but they include file
pages, so a program that mmaps a 7 GB file shows up to 7 GB there while allocating nothing.

Use from Python: `measure(["cp", a, b])`, `measure_python("mymod:main", args=[...])`, or from a
shell: `python bench/_measure.py -- cp a b` (prints JSON).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

MB = 1 << 20


@dataclass
class Measurement:
    label: str
    argv: List[str]
    returncode: int
    wall_s: float
    peak_rss_anon: int  # bytes
    peak_rss_file: int  # bytes
    vm_hwm: int  # bytes
    max_rss: int  # bytes (getrusage of children)
    user_s: float
    sys_s: float
    samples: int
    stderr_tail: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.label}: {self.wall_s:.2f} s, peak anon {self.peak_rss_anon / MB:.0f} MB, "
                f"peak file {self.peak_rss_file / MB:.0f} MB, VmHWM {self.vm_hwm / MB:.0f} MB"
                + ("" if self.ok else f", exit {self.returncode}"))


def _status(pid: int) -> Dict[str, int]:
    """The memory lines of /proc/<pid>/status in bytes ({} when the process is gone)."""
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"RssAnon", b"RssFile", b"VmHWM"):
                    out[key.decode()] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _tree(pid: int) -> List[int]:
    """pid and all its descendants (via /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def measure(argv: Sequence[str], label: Optional[str] = None, *, env: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None, interval: float = 0.002, timeout: Optional[float] = None) -> Measurement:
    """Run `argv` and measure it. stdout is discarded; the last lines of stderr are kept."""
    argv = [str(a) for a in argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stderr_path = f"/tmp/.measure-{os.getpid()}-{time.monotonic_ns()}.err"
    with open(stderr_path, "w+b") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        peak_anon = peak_file = hwm = samples = 0
        status = None
        try:
            while True:
                pid_done, status, _ = os.wait4(proc.pid, os.WNOHANG)
                if pid_done:
                    break
                anon = file_ = 0
                for p in _tree(proc.pid):
                    s = _status(p)
                    anon += s.get("RssAnon", 0)
                    file_ += s.get("RssFile", 0)
                    hwm = max(hwm, s.get("VmHWM", 0))
                peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file_)
                samples += 1
                if timeout is not None and time.perf_counter() - start > timeout:
                    proc.kill()
                time.sleep(interval)
        except BaseException:  # the benchmark was interrupted: do not leave the command running
            proc.terminate()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = b"".join(err.read().splitlines(keepends=True)[-5:]).decode(errors="replace")
    os.unlink(stderr_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Measurement(
        label=label or " ".join(argv), argv=argv, returncode=proc.returncode, wall_s=wall,
        peak_rss_anon=peak_anon, peak_rss_file=peak_file, vm_hwm=hwm, max_rss=after.ru_maxrss * 1024,
        user_s=after.ru_utime - before.ru_utime, sys_s=after.ru_stime - before.ru_stime, samples=samples,
        stderr_tail=tail,
    )


def measure_python(target: str, args: Sequence[str] = (), label: Optional[str] = None, **kw) -> Measurement:
    """Measure `module:function(*args)` in a fresh interpreter (args are passed as strings)."""
    module, _, func = target.partition(":")
    code = f"import sys, {module} as m; sys.exit(m.{func}(*sys.argv[1:]) or 0)"
    return measure([sys.executable, "-c", code, *args], label=label or target, **kw)


def machine_facts(folder: str = ".") -> Dict[str, str]:
    """What a reader needs to judge the figures: CPU, cores, RAM, kernel, file system, versions."""
    facts: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        facts["cpu"] = platform.processor() or "?"
    facts["cores"] = str(os.cpu_count())
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal"))
        facts["ram"] = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, StopIteration):
        pass
    facts["kernel"] = platform.release()
    facts["load average (1/5/15 min) at start"] = "%.1f / %.1f / %.1f" % os.getloadavg()
    facts["python"] = platform.python_version()
    try:
        fs = subprocess.run(["stat", "-f", "-c", "%T", folder], capture_output=True, text=True).stdout.strip()
        dev = subprocess.run(["df", "--output=source", folder], capture_output=True, text=True).stdout.split()[-1]
        facts["file system"] = f"{fs} on {dev}"
    except (OSError, IndexError):
        pass
    usage = shutil.disk_usage(folder)
    facts["disk free"] = f"{usage.free / (1 << 30):.0f} GiB of {usage.total / (1 << 30):.0f} GiB"
    for mod in ("numpy", "torch", "safetensors"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: say so, do not fail the benchmark
            facts[mod] = "absent"
    return facts


def main(argv: Sequence[str]) -> int:
    if "--" in argv:
        argv = argv[list(argv).index("--") + 1:]
    if not argv:
        print("usage: python bench/_measure.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    m = measure(argv)
    print(json.dumps(m.as_dict(), indent=2))
    return m.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
