"""Start-up benchmark: how long does a header-only command take, whole process, from the shell?

Every row is a fresh `python -m sdtk ...` process (interpreter start, imports, work, exit), timed
from fork to exit with wait4 (no sampler competing for the CPU); each runs `--repeat` times and the
median and the minimum are reported, beside bare `python -c pass` in the same run. The minimum is
the figure least disturbed by other jobs on the machine.

Files (sparse: the header is real, the tensor data a hole):
  flux1-dev.safetensors  the flux1-dev layout, bf16, 23.8 GB
  sd15.safetensors       the sd15-full-ema layout
  small.safetensors      a 1/8-scale SD1.5 file with real bytes, hashed once first so that
                         `hash` is answered from the hash cache (SDTK_HASH_CACHE in the temp folder)
A library database (SDTK_LIBRARY_DB in the temp folder) is built from the folder once first.

Then `python -X importtime -m sdtk inspect --json flux1-dev.safetensors` gives the import-time
breakdown (top-level packages, cumulative), and the heavy modules each command imported are
listed (numpy, ml_dtypes, rich, pydantic, sqlite3, blake3).

Usage:  python bench/bench_startup.py [--repeat 9] [--dir DIR]
Writes bench/results/startup.md; deletes its files at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(BENCH))

from _measure import machine_facts  # noqa: E402

TARGET_S = 0.25
HEAVY = ("numpy", "ml_dtypes", "rich", "pydantic", "sqlite3", "blake3", "yaml")
# Prints which heavy modules are loaded when the process exits (run as `python PROBE ARGS`).
PROBE = """import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write("HEAVY=" + ",".join(m for m in %r if m in sys.modules) + "\\n"))
sys.argv = ["sdtk"] + sys.argv[1:]
runpy.run_module("sdtk", run_name="__main__")
""" % (HEAVY,)


def timed(argv: Sequence[str], env: Dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {err.decode()[-500:]}")
    return wall


def heavy_modules(args: Sequence[str], env: Dict[str, str], probe: Path) -> str:
    out = subprocess.run([sys.executable, str(probe), *args], capture_output=True, text=True, env=env)
    m = re.search(r"HEAVY=(.*)", out.stderr)
    return (m.group(1) or "none") if m else "?"


def import_breakdown(args: Sequence[str], env: Dict[str, str]) -> List[tuple]:
    """(cumulative ms, top-level package) of `python -X importtime -m sdtk ARGS`, largest first."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdtk", *args], capture_output=True, text=True, env=env)
    per_top: Dict[str, int] = {}
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            self_us, name = int(m.group(1)), m.group(4)
            top = name.split(".")[0]
            per_top[top] = per_top.get(top, 0) + self_us
    return sorted(((us / 1000, name) for name, us in per_top.items()), reverse=True)


def make_files(folder: Path, env: Dict[str, str]) -> Dict[str, Path]:
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.samples import layout_plan, load_layout, write_sparse_safetensors

    files = {"flux": folder / "models" / "flux1-dev.safetensors", "sd15": folder / "models" / "sd15.safetensors",
             "small": folder / "library" / "small.safetensors"}
    files["flux"].parent.mkdir(parents=True)
    files["small"].parent.mkdir(parents=True)
    write_sparse_safetensors(files["flux"], load_layout("flux1-dev"))
    write_sparse_safetensors(files["sd15"], load_layout("sd15-full-ema"))
    write_safetensors(files["small"], layout_plan(load_layout("sd15-emaonly"), values="random", scale=8))
    sdtk = [sys.executable, "-m", "sdtk"]
    subprocess.run([*sdtk, "hash", str(files["small"])], check=True, env=env, capture_output=True)
    # the library indexes a folder of real (small) files: scanning hashes them
    subprocess.run([*sdtk, "library", "scan", str(files["small"].parent)], check=True, env=env, capture_output=True)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=str(BENCH / "results" / "startup.md"))
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sdtk-bench-startup-", dir=args.dir))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SDTK_HASH_CACHE=str(folder / "hashes.sqlite3"),
               SDTK_LIBRARY_DB=str(folder / "library.sqlite3"), COLUMNS="80")
    try:
        files = make_files(folder, env)
        probe = folder / "probe.py"
        probe.write_text(PROBE)
        flux, sd15, small, models = str(files["flux"]), str(files["sd15"]), str(files["small"]), str(files["flux"].parent)
        commands = [
            ("python -c pass", [sys.executable, "-c", "pass"], None),
            ("sdtk --version", None, ["--version"]),
            ("sdtk --help", None, ["--help"]),
            ("sdtk inspect --json FLUX", None, ["inspect", "--json", flux]),
            ("sdtk inspect FLUX", None, ["inspect", flux]),
            ("sdtk inspect SD1.5 (report)", None, ["inspect", sd15]),
            ("sdtk inspect FOLDER (listing)", None, ["inspect", models]),
            ("sdtk scan FLUX", None, ["scan", flux]),
            ("sdtk hash FILE (from the cache)", None, ["hash", small]),
            ("sdtk library list", None, ["library", "list"]),
            ("sdtk library show FILE", None, ["library", "show", small]),
            ("sdtk library find HASH", None, ["library", "find", "abcdef"]),
            ("sdtk library dupes", None, ["library", "dupes"]),
        ]
        rows = []
        for label, argv, sdtk_args in commands:
            argv = argv or [sys.executable, "-m", "sdtk", *sdtk_args]
            timed(argv, env)  # warm the page cache and __pycache__
            times = [timed(argv, env) for _ in range(args.repeat)]
            heavy = heavy_modules(sdtk_args, env, probe) if sdtk_args else "-"
            rows.append((label, statistics.median(times), min(times), heavy))
            print(f"{label:34s} median {rows[-1][1]:.3f} s  min {rows[-1][2]:.3f} s  heavy: {heavy}", flush=True)
        breakdown = import_breakdown(["inspect", "--json", flux], env)
        load = os.getloadavg()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_results(Path(args.out), rows, breakdown, args.repeat, load)
    return 0


def write_results(out: Path, rows, breakdown, repeat: int, load) -> None:
    facts = machine_facts(str(REPO))
    lines = ["# Start-up: header-only commands, whole process", "",
             f"Generated by `python bench/bench_startup.py` (see its docstring). {repeat} runs of each "
             f"command, median and minimum wall time (fork to exit); target {TARGET_S} s. "
             f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.", "",
             "| command | median | min | target | heavy modules imported |", "|---|---|---|---|---|"]
    for label, med, low, heavy in rows:
        target = "" if label.startswith("python") else ("met" if med <= TARGET_S else "over")
        lines.append(f"| {label} | {med:.3f} s | {low:.3f} s | {target} | {heavy} |")
    lines += ["", "Import time of `sdtk inspect --json flux1-dev.safetensors` by top-level package "
              "(`python -X importtime`, self times summed, ms; one run):", "",
              "| package | ms |", "|---|---|"]
    total = sum(ms for ms, _ in breakdown)
    for ms, name in breakdown[:15]:
        lines.append(f"| {name} | {ms:.1f} |")
    lines += [f"| (all {len(breakdown)} packages) | {total:.1f} |", "", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    previous = out.read_text() if out.exists() else ""
    analysis = previous[previous.index("## Analysis"):] if "## Analysis" in previous else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + ("\n" + analysis if analysis else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
