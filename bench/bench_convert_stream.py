"""Streaming convert benchmark: a full-size SD 1.5 checkpoint (.ckpt, 7.7 GB fp32) to safetensors.

In one run, side by side, on the same input file:
  cp            `cp IN OUT` (the physical limit: the same bytes copied; its data may still sit
                dirty in the page cache when it exits)
  cp + sync     `cp IN OUT && sync OUT` (the same, flushed to disk; sdtk fsyncs its output, so this
                is the fair comparison)
  sdtk convert  `python -m sdtk convert IN OUT.safetensors` (container change, streaming; by
                default it also hashes the input, SHA-256, AutoV3 and the content hash, for the
                lineage metadata, in a background thread: one more read of the input, concurrent
                with the copy), twice: with the hash cache off (the first conversion of a file)
                and with a cache that already knows the input
  sdtk convert --no-source-hash   the same without hashing the input
  torch way     `torch.load(IN, weights_only=True)` + `safetensors.torch.save_file` (the common
                way; no fsync)
Each is measured with bench/_measure.py (wall time, peak anonymous RSS, peak file RSS, VmHWM).

Input: the real `sd15-full-ema` layout (1831 tensors, 1.93 G parameters) as a Lightning-style
checkpoint written by sdtk.formats.torchzip_write (byte-for-byte what torch.save writes). Its
float data are real bytes, not zeros or holes: slices of one 64 MB block of seeded normal
float32 values (0.05 * N(0,1)) at varying offsets, so the file costs real disk I/O and cannot be
compressed or deduplicated by the file system; integer tensors get their layout values.

Fairness: before every measured run the input is read once (`cat IN > /dev/null`) so each
command starts with the same warm page cache, and after every run `sync` flushes whatever the
command left dirty (not measured) so it does not slow the next one. Outputs are deleted between
runs. Each command runs `--repeat` times; the table gives the best and all runs.

Usage:  python bench/bench_convert_stream.py [--dir DIR] [--repeat 2] [--no-torch]
Writes bench/results/convert_stream.md and deletes its multi-GB files at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(BENCH))

from _measure import MB, Measurement, machine_facts, measure, measure_python  # noqa: E402
from sdtk.formats.torchzip_write import write_torch_zip  # noqa: E402
from sdtk.samples import layout_plan, load_layout  # noqa: E402
from sdtk.tensors import LazyTensor  # noqa: E402

LAYOUT = "sd15-full-ema"
BLOCK_BYTES = 64 << 20
SEED = 1234
TARGET_ANON_MB = 500
TARGET_RATIO = 1.5
ANALYSIS_MARK = "## Analysis"  # a hand-written section of the results file, kept across runs


# --- the input file ---------------------------------------------------------------------------


def value_block() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return (rng.standard_normal(BLOCK_BYTES // 4, dtype=np.float32) * np.float32(0.05))


def bench_plan(block: np.ndarray, scale=None) -> List[LazyTensor]:
    """The layout's tensors; float tensors are slices of `block` (tiled when larger).
    `scale` divides every dimension (a quick smoke run of this script, not the benchmark)."""
    plan = layout_plan(load_layout(LAYOUT), scale=scale)
    out = []
    for i, t in enumerate(plan):
        if t.dtype.is_float:
            out.append(LazyTensor(t.name, t.dtype, t.shape, loader=_slice_loader(block, t, i)))
        else:
            out.append(t)
    return out


def _slice_loader(block: np.ndarray, t: LazyTensor, i: int):
    def load() -> np.ndarray:
        n = t.numel
        if n > block.size:
            return np.resize(block, n).astype(t.dtype.numpy, copy=False).reshape(t.shape)
        start = (i * 1_000_003) % (block.size - n + 1)
        return block[start:start + n].astype(t.dtype.numpy, copy=False).reshape(t.shape)

    return load


def make_input(path: Path, scale=None) -> float:
    start = time.perf_counter()
    write_torch_zip(path, bench_plan(value_block(), scale), top="sd15-full-ema", wrap="state_dict",
                    extras={"global_step": 840000, "epoch": 6}, overwrite=True)
    return time.perf_counter() - start


# --- the common way (run in its own interpreter by measure_python) ------------------------------


def torch_way(src: str, dst: str) -> int:
    import torch
    from safetensors.torch import save_file

    obj = torch.load(src, map_location="cpu", weights_only=True)
    save_file(obj.get("state_dict", obj), dst)
    return 0


# --- checks of the outputs ----------------------------------------------------------------------


def check_output(path: Path, plan: List[LazyTensor]) -> str:
    """Every tensor present with its dtype and shape; a sample of them bit-identical."""
    from sdtk.formats.safetensors import read_safetensors

    with read_safetensors(path) as cat:
        if [(n, t.dtype, t.shape) for n, t in cat.tensors.items()] != [(t.name, t.dtype, t.shape) for t in plan] and \
                sorted((n, t.dtype.name, t.shape) for n, t in cat.tensors.items()) != sorted((t.name, t.dtype.name, t.shape) for t in plan):
            return "tensor list differs"
        sample = plan[:: max(1, len(plan) // 40)] + [max(plan, key=lambda t: t.nbytes)]
        for t in sample:
            if cat.tensors[t.name].read().tobytes() != np.ascontiguousarray(t.read()).tobytes():
                return f"tensor {t.name} differs"
    return "ok"


# --- running ------------------------------------------------------------------------------------


def warm(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


FIRST = "sdtk convert (source hashes computed: first conversion of the file)"
CACHED = "sdtk convert (source hashes from the hash cache)"


def run_candidates(src: Path, work: Path, repeat: int, with_torch: bool, plan) -> Dict[str, List[Measurement]]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    torch_env = dict(os.environ, PYTHONPATH=str(BENCH) + os.pathsep + str(REPO / "src"))
    dst_copy, dst_st = work / "copy.ckpt", work / "out.safetensors"
    # a hash cache that knows the input, as after any earlier `sdtk hash`, library scan or convert
    cache = work / "hash-cache.sqlite3"
    subprocess.run([sys.executable, "-m", "sdtk", "hash", "--content", "-q", str(src)], env=dict(env, SDTK_HASH_CACHE=str(cache)),
                   check=True, stdout=subprocess.DEVNULL)
    candidates = [
        ("cp", lambda: measure(["cp", src, dst_copy], "cp"), dst_copy),
        ("cp + sync", lambda: measure(["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, dst_copy], "cp + sync"), dst_copy),
        (FIRST, lambda: measure([sys.executable, "-m", "sdtk", "convert", src, dst_st], "sdtk convert",
                                env=dict(env, SDTK_HASH_CACHE="off")), dst_st),
        (CACHED, lambda: measure([sys.executable, "-m", "sdtk", "convert", src, dst_st], "sdtk convert (cached hashes)",
                                 env=dict(env, SDTK_HASH_CACHE=str(cache))), dst_st),
        ("sdtk convert --no-source-hash",
         lambda: measure([sys.executable, "-m", "sdtk", "convert", "--no-source-hash", src, dst_st],
                         "sdtk convert --no-source-hash", env=env), dst_st),
    ]
    if with_torch:
        candidates.append(("torch.load + save_file",
                           lambda: measure_python("bench_convert_stream:torch_way", [str(src), str(dst_st)],
                                                  label="torch.load + save_file", env=torch_env), dst_st))
    results: Dict[str, List[Measurement]] = {name: [] for name, _, _ in candidates}
    checks: Dict[str, str] = {}
    for round_ in range(repeat):
        for name, run, dst in candidates:
            if name.startswith("torch") and round_ > 0:
                continue  # one run: it needs ~2x the model in RAM
            warm(src)
            m = run()
            subprocess.run(["sync"], check=True)
            print("  " + m.summary(), flush=True)
            if not m.ok:
                print("    stderr: " + m.stderr_tail.strip().replace("\n", "\n    "), flush=True)
            elif dst.suffix == ".safetensors" and name not in checks:
                checks[name] = check_output(dst, plan)
                print(f"    output check: {checks[name]}", flush=True)
            results[name].append(m)
            dst.unlink(missing_ok=True)
    results["_checks"] = checks  # type: ignore[assignment]
    return results


def best(ms: List[Measurement]) -> Measurement:
    """The median run by wall time (the machine is shared: one lucky or unlucky run says little)."""
    return sorted(ms, key=lambda m: m.wall_s)[(len(ms) - 1) // 2]


def report(results, facts, size: int, build_s: float, repeat: int) -> str:
    checks = results.pop("_checks")
    cp, cp_sync = best(results["cp"]), best(results["cp + sync"])
    lines = [
        "# Streaming convert: sd15-full-ema .ckpt (fp32) to safetensors",
        "",
        f"Run by `python bench/bench_convert_stream.py --repeat {repeat}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += [
        "",
        "## Input",
        "",
        f"The `{LAYOUT}` layout (1831 tensors, 1.93 G parameters, fp32) as a Lightning-style `.ckpt`",
        f"written by `sdtk.formats.torchzip_write` (byte-identical to `torch.save`): {size:,} bytes",
        f"({size / 1e9:.2f} GB), written in {build_s:.1f} s. Float data are real bytes (slices of a 64 MB block",
        "of seeded normal float32 values), not holes. Every command starts with the input in the page",
        "cache (`cat IN > /dev/null` before each run) and `sync` runs, unmeasured, after each run.",
        "",
        "## Results",
        "",
        f"Median of {repeat} runs (torch way: 1 run). Ratios are wall time over `cp` and over `cp + sync`.",
        "Peak anon = peak RssAnon (anonymous memory) of the process tree, sampled every 2 ms; peak file =",
        "peak RssFile (mmap'd/cached file pages, reclaimable); VmHWM = kernel peak RSS (anon + file).",
        "",
        "CPU s = user + system CPU time of the median run (independent of the machine's load, unlike wall time).",
        "",
        "| command | wall s | / cp | / cp+sync | CPU s | peak anon MB | peak file MB | VmHWM MB | all runs (s) | output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, ms in results.items():
        if not ms:
            continue
        m = best(ms)
        runs = ", ".join(f"{x.wall_s:.2f}" + ("" if x.ok else f" (exit {x.returncode})") for x in ms)
        lines.append(f"| {name} | {m.wall_s:.2f} | {m.wall_s / cp.wall_s:.2f} | {m.wall_s / cp_sync.wall_s:.2f} | {m.user_s + m.sys_s:.1f} | "
                     f"{m.peak_rss_anon / MB:.0f} | {m.peak_rss_file / MB:.0f} | {m.vm_hwm / MB:.0f} | {runs} | "
                     f"{checks.get(name, 'copy') if m.ok else 'FAILED'} |")
    lines += ["", "## Targets", ""]
    for name in (FIRST, CACHED, "sdtk convert --no-source-hash"):
        sd = results.get(name)
        if not (sd and all(m.ok for m in sd)):
            lines.append(f"- `{name}` did not run successfully (see the table).")
            continue
        m = best(sd)
        anon_ok = m.peak_rss_anon / MB < TARGET_ANON_MB
        ratio_sync, ratio_cp = m.wall_s / cp_sync.wall_s, m.wall_s / cp.wall_s
        lines += [
            f"- `{name}`: peak anonymous RSS < {TARGET_ANON_MB} MB **{'met' if anon_ok else 'MISSED'}** ({m.peak_rss_anon / MB:.0f} MB); "
            f"wall time within {TARGET_RATIO}x of cp: **{'met' if ratio_sync <= TARGET_RATIO else 'MISSED'}** against `cp + sync` "
            f"({ratio_sync:.2f}x; sdtk fsyncs its output, so this is the like-for-like copy), "
            f"**{'met' if ratio_cp <= TARGET_RATIO else 'missed'}** against plain `cp` ({ratio_cp:.2f}x)",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="folder for the multi-GB files (default: a temp folder in /tmp)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per command (torch way: always 1)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.load + save_file way")
    ap.add_argument("--out", default=str(BENCH / "results" / "convert_stream.md"))
    ap.add_argument("--scale", type=int, default=None, help="divide every dimension (smoke test only)")
    args = ap.parse_args(argv)
    # `kill` (SIGTERM) must still delete the multi-GB files: turn it into an exception
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="sdtk-bench-convert-", dir=args.dir))
    try:
        facts = machine_facts(str(work))
        src = work / "sd15-full-ema.ckpt"
        print(f"writing {src} ...", flush=True)
        build_s = make_input(src, args.scale)
        size = src.stat().st_size
        print(f"  {size:,} bytes in {build_s:.1f} s", flush=True)
        plan = bench_plan(value_block(), args.scale)
        results = run_candidates(src, work, args.repeat, not args.no_torch, plan)
        facts["load average (1/5/15 min) at end"] = "%.1f / %.1f / %.1f" % os.getloadavg()
        text = report(results, facts, size, build_s, args.repeat)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and ANALYSIS_MARK in out.read_text():  # keep the hand-written analysis
            text += "\n" + out.read_text()[out.read_text().index(ANALYSIS_MARK):]
        out.write_text(text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
