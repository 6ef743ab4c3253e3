"""Merge benchmark: sdtk vs sd-mecha 1.1.8 vs naive load-both-then-save, side by side, same inputs.

Usage:
  python bench/bench_merge.py --dir /tmp/mbench --mecha-python /work/bench-venv/bin/python [--keep]

Makes full-size files with non-zero data (each tensor: a random block repeated, so the bytes are
real but generation is fast), runs each contender in its own process and samples its
/proc/PID/status every 10 ms: peak RssAnon (anonymous memory, what the merge really allocates)
separately from RssFile (mmap'd file pages, reclaimable page cache). Inputs are read once
before each run so every contender starts from a warm page cache. Writes bench/results/merge.md.

Scenarios:
  1. SDXL fp16 x 2 (6.9 GB each), weighted sum alpha 0.5, fp16 output.
  2. SD1.5 fp32 x 3 (4.3 GB each: inpainting-style recipe shape), add difference alpha 1, fp16 output
     (sdtk through a YAML recipe).
Big files are deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sdtk.formats.safetensors import write_safetensors  # noqa: E402
from sdtk.samples import load_layout  # noqa: E402
from sdtk.tensors import LazyTensor, dtype as dtype_named, numel  # noqa: E402

BLOCK = 1 << 20  # elements of random data per seed, repeated through each tensor


def real_data_plan(layout, seed: int):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(BLOCK, dtype=np.float32) * 0.05)
    plan = []
    for key, shape, dt_name in layout.tensors:
        dt = dtype_named(dt_name)
        shape = tuple(shape)

        def load(key=key, shape=shape, dt=dt):
            n = numel(shape)
            if not dt.is_float:
                return np.broadcast_to(np.arange(shape[-1], dtype=dt.numpy), shape).copy()
            off = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % BLOCK
            return np.resize(np.roll(base, -off).astype(dt.numpy), n).reshape(shape)

        plan.append(LazyTensor(key, dt, shape, load))
    return plan


def make_inputs(folder: Path, layout_name: str, dtype: str, count: int, prefix: str):
    layout = load_layout(layout_name).with_dtype(dtype)
    paths = []
    for i in range(count):
        p = folder / f"{prefix}-{chr(97 + i)}.safetensors"
        if not p.exists():
            t = time.time()
            write_safetensors(p, real_data_plan(layout, seed=100 + i), {"bench": "sdtk"}, overwrite=True)
            print(f"  made {p.name}: {p.stat().st_size / 1e9:.2f} GB in {time.time() - t:.1f} s", flush=True)
        paths.append(p)
    return paths


def warm(paths):
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def run_measured(cmd, env=None):
    """Run cmd; sample peak RssAnon / RssFile (kB) of the process every 10 ms."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def sample():
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(path) as fh:
                    for line in fh:
                        k, _, v = line.partition(":")
                        if k in peak:
                            peak[k] = max(peak[k], int(v.split()[0]))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    wall = time.time() - t0
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}", flush=True)
    return {"seconds": round(wall, 1), "rss_anon_mb": round(peak["RssAnon"] / 1024), "rss_file_mb": round(peak["RssFile"] / 1024),
            "hwm_mb": round(peak["VmHWM"] / 1024), "ok": proc.returncode == 0, "stderr": err[-500:]}


NAIVE = textwrap.dedent('''
    import sys, torch
    from safetensors.torch import load_file, save_file
    method, out, alpha, *ins = sys.argv[1:]
    alpha = float(alpha)
    sds = [load_file(p) for p in ins]  # all inputs in RAM
    res = sds[0]  # results replace A's tensors as they are computed (the kindest naive variant)
    for k in list(res):
        a = res[k]
        if not a.is_floating_point():
            continue
        x = [sd[k].float() for sd in sds]
        r = (1 - alpha) * x[0] + alpha * x[1] if method == "ws" else x[0] + alpha * (x[1] - x[2])
        res[k] = r.half()
        for sd in sds[1:]:
            del sd[k]
        del x, r
    save_file(res, out)
''')

MECHA = textwrap.dedent('''
    import sys, torch, sd_mecha
    method, out, alpha, *ins = sys.argv[1:]
    alpha = float(alpha)
    ms = [sd_mecha.model(p) for p in ins]
    if method == "ws":
        r = sd_mecha.weighted_sum(ms[0], ms[1], alpha=alpha)
    else:
        r = sd_mecha.add_difference(ms[0], ms[1], ms[2], alpha=alpha)
    sd_mecha.merge(r, output=out, merge_dtype=torch.float32, output_dtype=torch.float16)
''')


def tensors_equal(p1, p2, keys=40):
    """Spot-check: the same tensors bit for bit in two outputs (first `keys` float keys + position_ids)."""
    from sdtk.formats import open_model

    with open_model(p1) as c1, open_model(p2) as c2:
        names = [k for k in c1.tensors if k in c2.tensors][:keys] + [k for k in c1.tensors if k.endswith("position_ids")]
        diff = [k for k in names if c1.tensors[k].dtype != c2.tensors[k].dtype or not np.array_equal(c1.tensors[k].read().view(np.uint8), c2.tensors[k].read().view(np.uint8))]
        missing = len(c1.tensors.keys() ^ c2.tensors.keys())
    return {"checked": len(names), "differ": diff[:5], "n_differ": len(diff), "key_set_difference": missing}


def mem_available_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def scenario(folder: Path, name: str, inputs, method: str, alpha: float, mecha_python: str, results: list,
             cache: dict, rerun: list):
    title, name = name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = folder / f"{name}-out.safetensors"
    sdtk_env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    runs = []
    sdtk_method = "weighted-sum" if method == "ws" else "add-difference"
    if method == "ws":
        sdtk_cmds = [("sdtk (sha256 of inputs on)", [sys.executable, "-m", "sdtk", "merge", *map(str, inputs), "-m", sdtk_method, "-a", str(alpha), "--dtype", "fp16", "-o", str(out), "--overwrite"]),
                     ("sdtk --no-hash", [sys.executable, "-m", "sdtk", "merge", *map(str, inputs), "-m", sdtk_method, "-a", str(alpha), "--dtype", "fp16", "-o", str(out), "--overwrite", "--no-hash"])]
    else:
        recipe = folder / f"{name}.yaml"
        recipe.write_text(textwrap.dedent(f'''
            models: {{a: {inputs[0].name}, b: {inputs[1].name}, c: {inputs[2].name}}}
            steps:
              - {{method: add-difference, inputs: [a, b, c], alpha: {alpha}}}
            dtype: fp16
        '''))
        sdtk_cmds = [("sdtk --recipe (sha256 on)", [sys.executable, "-m", "sdtk", "merge", "--recipe", str(recipe), "-o", str(out), "--overwrite"]),
                     ("sdtk --recipe --no-hash", [sys.executable, "-m", "sdtk", "merge", "--recipe", str(recipe), "-o", str(out), "--overwrite", "--no-hash"])]
    ref_out = folder / f"{name}-naive.safetensors"
    for label, cmd, env, keep_as in [
        *[(l, c, sdtk_env, out) for l, c in sdtk_cmds],
        ("sd-mecha 1.1.8", [mecha_python, "-c", MECHA, method, str(folder / f"{name}-mecha.safetensors"), str(alpha), *map(str, inputs)], None, None),
        ("naive (safetensors.torch load both, merge, save)", [sys.executable, "-c", NAIVE, method, str(ref_out), str(alpha), *map(str, inputs)], None, ref_out),
    ]:
        cached = cache.get(title, {}).get(label)
        if cached and not any(x in label for x in rerun) and (keep_as is None or keep_as.exists()):
            print(f"  {name}: {label}: cached {cached['seconds']} s, {cached['rss_anon_mb']} MB", flush=True)
            runs.append(cached)
            continue
        need = sum(p.stat().st_size for p in inputs) // 2**20
        if label.startswith("naive") and mem_available_mb() < need * 1.25:
            print(f"  {name}: {label}: skipped, needs ~{need} MB, {mem_available_mb()} MB available", flush=True)
            runs.append({"label": label, "seconds": None, "rss_anon_mb": None, "rss_file_mb": None, "ok": False,
                         "skipped": f"needs about {need} MB of RAM, {mem_available_mb()} MB available"})
            continue
        warm(inputs)
        print(f"  {name}: {label} ...", flush=True)
        r = run_measured(cmd, env)
        r["label"] = label
        cache.setdefault(title, {})[label] = r
        (folder / "cache.json").write_text(json.dumps(cache, indent=2))
        print(f"    {r['seconds']} s, peak RssAnon {r['rss_anon_mb']} MB, RssFile {r['rss_file_mb']} MB", flush=True)
        runs.append(r)
        mecha_out = folder / f"{name}-mecha.safetensors"
        if label.startswith("sd-mecha") and mecha_out.exists():
            mecha_out.unlink()
    check = tensors_equal(out, ref_out) if out.exists() and ref_out.exists() else None
    for p in (out, ref_out):
        if p.exists():
            p.unlink()
    results.append({"scenario": title, "inputs": [f"{p.name} ({p.stat().st_size / 1e9:.2f} GB)" for p in inputs], "runs": runs, "sdtk_vs_naive": check})


def write_report(results, path: Path, facts=None, loads=None):
    lines = ["# Merge benchmark (bench/bench_merge.py)", "",
             "Each contender runs in its own process on the same inputs, one after the other, inputs read once "
             "before each run (warm page cache). Peak RssAnon = anonymous memory, what the merge allocates; "
             "RssFile = mmap'd file pages (page cache, reclaimable). Sampled from /proc/PID/status every 10 ms.",
             "sd-mecha 1.1.8 runs in its own venv (torch 2.13.0 CPU) with `merge_dtype=float32, output_dtype=float16` "
             "and its default threads; naive = `safetensors.torch.load_file` of every input, merge in float32, "
             "`save_file` (results replace A's tensors as they are computed, the kindest naive variant).", ""]
    if facts:
        lines += ["Machine: " + "; ".join(f"{k}: {v}" for k, v in facts.items()), ""]
    if loads:
        lines += [loads, ""]
    for sc in results:
        lines += [f"## {sc['scenario']}", "", "Inputs: " + ", ".join(sc["inputs"]), "",
                  "| tool | wall s | peak RssAnon MB | peak RssFile MB | ok |", "|---|---:|---:|---:|---|"]
        for r in sc["runs"]:
            status = "yes" if r["ok"] else ("skipped: " + r["skipped"] if r.get("skipped") else "FAILED")
            lines.append(f"| {r['label']} | {r['seconds']} | {r['rss_anon_mb']} | {r['rss_file_mb']} | {status} |")
        runs = {r["label"]: r for r in sc["runs"] if r.get("ok")}
        mecha = runs.get("sd-mecha 1.1.8")
        for r in sc["runs"]:
            if r.get("ok") and r["label"].startswith("sdtk") and mecha:
                lines.append("")
                lines.append(f"{r['label']}: {r['rss_anon_mb'] / mecha['rss_anon_mb'] * 100:.1f} % of sd-mecha's peak anonymous memory, "
                             f"{mecha['seconds'] / r['seconds']:.2f}x its speed.")
        if sc["sdtk_vs_naive"]:
            c = sc["sdtk_vs_naive"]
            lines += ["", f"sdtk output vs the naive torch float32 result: {c['checked']} tensors compared bit for bit "
                      f"(the first 40 and every position_ids), {c['n_differ']} differ {c['differ']}; key-set difference {c['key_set_difference']}."]
        lines.append("")
    path.write_text("\n".join(lines))


def _facts(folder):
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        from _measure import machine_facts

        return machine_facts(str(folder))
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/sdtk-merge-bench")
    ap.add_argument("--mecha-python", default="/work/bench-venv/bin/python")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", choices=["sdxl", "sd15"], default=None)
    ap.add_argument("--rerun", action="append", default=[], help="re-measure contenders whose label contains this (others come from DIR/cache.json)")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    cache_path = folder / "cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    try:
        if args.only in (None, "sdxl"):
            print("SDXL fp16 x2", flush=True)
            ins = make_inputs(folder, "sdxl-base", "float16", 2, "sdxl")
            scenario(folder, "SDXL fp16 weighted sum (alpha 0.5)", ins, "ws", 0.5, args.mecha_python, results, cache, args.rerun)
            if not args.keep:
                for p in ins:
                    p.unlink()
        if args.only in (None, "sd15"):
            print("SD1.5 fp32 x3", flush=True)
            ins = make_inputs(folder, "sd15-emaonly", "float32", 3, "sd15")
            scenario(folder, "SD1.5 fp32 add difference recipe (3 models, alpha 1.0)", ins, "ad", 1.0, args.mecha_python, results, cache, args.rerun)
            if not args.keep:
                for p in ins:
                    p.unlink()
    finally:
        out = ROOT / "bench" / "results" / "merge.md"
        if results:
            write_report(results, out, _facts(folder))
            print(out.read_text())
            (folder / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
