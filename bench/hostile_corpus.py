"""Run `sdtk scan` and `sdtk convert` on every hostile file we have, each with a time limit.

Files: the public picklescan corpus (tests/data/picklescan/data, data2) and sdtk's own hostile
files (tests/hostile_files.py, written to a temporary folder). Each command runs in its own
process (`python -m sdtk`, this checkout's src/) with a per-command time limit. Prints one row
per file: scan verdict, scan exit code and time, convert exit code and time, and flags any
timeout, traceback, output written for a refused file, or a payload that ran (marker file).

    python bench/hostile_corpus.py [--timeout 60] [--only NAME-SUBSTRING] [--in-process]

`--in-process` calls the library (`sdtk.scan.scan_file`, `sdtk.ops.convert.convert_file`) in this
process, each call under a SIGALRM time limit: the same readers without interpreter start-up
(on a loaded machine start-up is most of a command's time).

Exit status 1 if anything was flagged, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from hostile_files import HOSTILE, write_hostile  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "picklescan"


def run(args, timeout: float, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "sdtk", *map(str, args)], capture_output=True, text=True,
                              errors="replace", timeout=timeout, env=env, cwd=cwd)
        return proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, "", ""


class _Timeout(Exception):
    pass


def run_in_process(command: str, path: Path, dest: Path, timeout: float):
    """(exit code or None on timeout, seconds, verdict or None, problem text) of one library call."""
    import signal

    from sdtk.errors import SdtkError

    def alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.perf_counter()
    try:
        if command == "scan":
            from sdtk.scan import exit_code, scan_file

            r = scan_file(path)
            return exit_code([r]), time.perf_counter() - start, r.verdict, ""
        from sdtk.ops.convert import ConvertOptions, convert_file, resolve_options

        try:
            convert_file(path, resolve_options(ConvertOptions(source_hashes=False)), output=dest)
            return 0, time.perf_counter() - start, None, ""
        except SdtkError as e:
            return e.exit_code, time.perf_counter() - start, None, str(e)
    except _Timeout:
        return None, time.perf_counter() - start, "TIMEOUT", ""
    except Exception as e:  # what would be a traceback on the command line
        return 3, time.perf_counter() - start, "?", f"Traceback: {type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per command")
    parser.add_argument("--only", default="", help="only files whose name contains this")
    parser.add_argument("--in-process", action="store_true", help="call the library in this process (SIGALRM limits)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtk-hostile-") as tmpdir:
        tmp = Path(tmpdir)
        marker = tmp / "MARKER"
        own = tmp / "own"
        own.mkdir()
        files = [("picklescan/" + str(p.relative_to(CORPUS)), p, None) for p in sorted(CORPUS.rglob("*"))
                 if p.is_file() and p.parent != CORPUS]
        files += [("sdtk/" + name, path, HOSTILE[name][1]) for name, path in write_hostile(own, marker).items()]
        files = [f for f in files if opts.only in f[0]]
        out_dir = tmp / "out"
        out_dir.mkdir()
        flagged = []
        print(f"{'file':<58} {'verdict':<10} {'scan':>4} {'s':>6} {'convert':>7} {'s':>6}  notes")
        for label, path, expected in files:
            notes = []
            dest = out_dir / "out.safetensors"
            if opts.in_process:
                code, scan_s, verdict, err = run_in_process("scan", path, dest, opts.timeout)
                ccode, conv_s, _, cerr = run_in_process("convert", path, dest, opts.timeout)
            else:
                code, scan_s, out, err = run(["scan", "--json", path], opts.timeout, tmp)
                verdict = "TIMEOUT"
                if code is not None:
                    try:
                        verdict = json.loads(out)["files"][0]["verdict"]
                    except (ValueError, KeyError, IndexError):
                        verdict = "?"
                        notes.append("no JSON")
                ccode, conv_s, cout, cerr = run(["convert", path, dest], opts.timeout, tmp)
            for what, c, e in (("scan", code, err), ("convert", ccode, cerr)):
                if c is None:
                    notes.append(f"{what} TIMEOUT")
                elif "Traceback" in e:
                    notes.append(f"{what} TRACEBACK")
            if ccode not in (0, None) and any(out_dir.iterdir()):
                notes.append("OUTPUT LEFT BEHIND")
            if ccode == 0 and verdict != "safe":
                notes.append("CONVERTED A FILE SCAN DID NOT CALL SAFE")
            if expected is not None and verdict != expected:
                notes.append(f"expected {expected}")
            if marker.exists():
                notes.append("PAYLOAD RAN")
                marker.unlink()
            for p in out_dir.iterdir():
                p.unlink()
            if notes:
                flagged.append((label, notes))
            print(f"{label:<58} {verdict:<10} {code if code is not None else '-':>4} {scan_s:6.2f} "
                  f"{ccode if ccode is not None else '-':>7} {conv_s:6.2f}  {'; '.join(notes)}")
        print()
        mode = "in-process library calls" if opts.in_process else "one `python -m sdtk` process per command"
        print(f"{len(files)} files; {mode}; per-command limit {opts.timeout:.0f} s; flagged: {len(flagged)}")
        for label, notes in flagged:
            print(f"  {label}: {'; '.join(notes)}")
        return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
