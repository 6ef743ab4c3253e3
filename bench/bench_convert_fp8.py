"""`sdtk convert --dtype fp8-e4m3fn` benchmark: a full-size SDXL checkpoint (fp16, 6.9 GB) to the
fp8 file people make to save VRAM and disk.

In one run, side by side, on the same input file:
  cp-like        read the whole input, write as many bytes as the output has, sync (the physical
                 limit for "read the input, write the output")
  sdtk           `sdtk convert IN --dtype fp8-e4m3fn -o OUT --no-source-hash` (fp16 -> fp32 on
                 F16C, fp32 -> fp8 in sdtk._fastcast's vectorised loop, saturating as torch does)
  sdtk, numpy    the same with SDTK_FASTCAST=off: numpy + ml_dtypes casts (ml_dtypes converts to
                 fp8 one value at a time), i.e. sdtk without its C extension
  torch way      `safetensors.torch.load_file`, `.to(torch.float8_e4m3fn)` per float tensor,
                 `save_file` (what conversion scripts do; no fsync)
Each is measured with bench/_measure.py (wall time, peak anonymous RSS, peak file RSS, VmHWM).

Input: the real `sdxl-base` layout (2,515 tensors) in fp16, every tensor real non-zero bytes
(bench_merge.real_data_plan: a random block repeated). Warm page cache before every run.
The sdtk output is compared tensor by tensor with the torch way's output (bits).

Usage:  python bench/bench_convert_fp8.py [--dir DIR] [--repeat 2] [--no-torch]
Writes bench/results/convert_fp8.md; deletes its multi-GB files at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from _measure import MB, Measurement, machine_facts, measure, measure_python  # noqa: E402


def torch_way(src: str, dst: str) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(src)
    save_file({k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v) for k, v in sd.items()}, dst)
    return 0


def warm(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def compare(a: Path, b: Path) -> str:
    from sdtk.formats import open_model

    with open_model(a) as x, open_model(b) as y:
        if set(x.tensors) != set(y.tensors):
            return f"different tensor sets ({len(x.tensors)} vs {len(y.tensors)})"
        diff = [n for n in x.tensors if x.tensors[n].read().tobytes() != y.tensors[n].read().tobytes()]
    return "every tensor identical (bits)" if not diff else f"{len(diff)} tensors differ (e.g. {diff[0]})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=str(BENCH / "results" / "convert_fp8.md"))
    args = ap.parse_args(argv)
    from bench_merge import make_inputs

    work = Path(tempfile.mkdtemp(prefix="sdtk-bench-fp8-", dir=args.dir))
    try:
        t0 = time.time()
        (src,) = make_inputs(work, "sdxl-base", "F16", 1, "sdxl-fp16")
        build_s = time.time() - t0
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        out_sdtk, out_cp, out_torch = work / "sdtk.safetensors", work / "cp.bin", work / "torch.safetensors"
        cmd = [sys.executable, "-m", "sdtk", "convert", str(src), "--dtype", "fp8-e4m3fn", "-o", str(out_sdtk),
               "--no-source-hash", "--overwrite"]
        warm(src)
        first = measure(cmd, "sdtk (first run, not counted)", env=env)
        print("  " + first.summary(), flush=True)
        if not first.ok:
            raise SystemExit(first.stderr_tail)
        out_size = out_sdtk.stat().st_size
        kept = work / "sdtk-kept.safetensors"
        os.replace(out_sdtk, kept)
        candidates = [
            ("cp-like (read input, write output bytes, sync)",
             lambda: measure(["sh", "-c", 'cat "$0" > /dev/null && head -c "$2" "$0" > "$1" && sync "$1"', str(src),
                              str(out_cp), str(out_size)], "cp-like"), out_cp),
            ("sdtk convert --dtype fp8-e4m3fn (C extension)", lambda: measure(cmd, "sdtk", env=env), out_sdtk),
            ("same, SDTK_FASTCAST=off (numpy + ml_dtypes casts)",
             lambda: measure(cmd, "sdtk numpy", env=dict(env, SDTK_FASTCAST="off")), out_sdtk),
        ]
        if not args.no_torch:
            candidates.append(("safetensors.torch load_file + .to(float8_e4m3fn) + save_file",
                               lambda: measure_python("bench_convert_fp8:torch_way", [str(src), str(out_torch)],
                                                      label="torch way",
                                                      env=dict(os.environ, PYTHONPATH=str(BENCH) + os.pathsep + str(REPO / "src"))),
                               out_torch))
        results: Dict[str, List[Measurement]] = {name: [] for name, _, _ in candidates}
        torch_check = "not run"
        for round_ in range(args.repeat):
            for name, go, dst in candidates:
                if name.startswith("safetensors.torch") and round_ > 0:
                    continue
                warm(src)
                m = go()
                subprocess.run(["sync"], check=True)
                print("  " + m.summary(), flush=True)
                if not m.ok:
                    print("    stderr: " + m.stderr_tail.strip(), flush=True)
                elif name.startswith("safetensors.torch") and torch_check == "not run":
                    torch_check = compare(kept, dst)
                    print(f"    torch output vs sdtk output: {torch_check}", flush=True)
                results[name].append(m)
                dst.unlink(missing_ok=True)
        best = {name: min(ms, key=lambda m: m.wall_s) for name, ms in results.items() if ms}
        cp = best[candidates[0][0]]
        lines = [
            "# Benchmark: `sdtk convert --dtype fp8-e4m3fn` of a full-size SDXL fp16 checkpoint",
            "",
            f"Input: `sdxl-base` layout, fp16, {src.stat().st_size:,} bytes of real non-zero data (built in {build_s:.0f} s). "
            f"Output: fp8-e4m3fn floats (saturating, as torch), {out_size:,} bytes. Warm page cache before every run; "
            f"best of {args.repeat} runs (torch: one run). Casts: {_cast_path()}.",
            "",
            "| command | wall (s) | vs cp-like | CPU user+sys (s) | peak anon RSS | peak file RSS | runs (s) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, ms in results.items():
            b = best[name]
            lines.append(f"| {name} | {b.wall_s:.2f} | {b.wall_s / cp.wall_s:.2f}x | {b.user_s + b.sys_s:.1f} | "
                         f"{b.peak_rss_anon / MB:.0f} MB | {b.peak_rss_file / MB:.0f} MB | {', '.join(f'{m.wall_s:.2f}' for m in ms)} |")
        lines += ["", f"- torch way's output vs sdtk's: {torch_check}", "", "## Machine", ""]
        lines += [f"- {k}: {v}" for k, v in machine_facts().items()]
        lines += [f"- load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}", "",
                  "Reproduce: `python bench/bench_convert_fp8.py` (about 12 GB of free disk)."]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cast_path() -> str:
    from sdtk import fastcast

    return fastcast.status()


if __name__ == "__main__":
    raise SystemExit(main())
