"""`sdtk lora extract` at full size: rank 64 from an SDXL pair (6.9 GB fp16 each), beside the anchor's
algorithm (kohya's extract_lora_from_models.py: a full SVD of every module's difference, then the
top-k vectors), with peak anonymous RSS.

Usage:
  python bench/bench_lora_extract.py [--dir /tmp/xbench] [--rank 64] [--sample 12] [--out bench/results/lora_extract.md]

The tuned model holds seeded random values in every tensor (a full-rank difference: the worst case
for a randomized SVD); the base is a sparse zero-filled file of the same layout, so the difference is
the tuned weights. Extraction covers the UNet's Linear / 1x1 modules (`--components unet`, sdtk's
and kohya's default set without `--conv-rank`). The anchor is timed on every `--sample`-th module of
the list sdtk wrote (torch.linalg.svd, full_matrices=False, float32, as kohya runs it on CPU) and
scaled to all modules by the m*n*min(m,n) cost of each SVD; the figure says so.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import machine_facts, measure  # noqa: E402
from sdtk.formats.safetensors import write_safetensors  # noqa: E402
from sdtk.samples import layout_plan, load_layout, write_sparse_safetensors  # noqa: E402

LAYOUT = "sdxl-base"


def svd_cost(shape) -> float:
    m, n = shape[0], 1
    for d in shape[1:]:
        n *= d
    return float(m) * n * min(m, n)


def anchor_seconds(tuned: Path, modules, every: int) -> dict:
    """kohya's per-module work on a sample: read the two weights, difference in fp32, full SVD, top-k."""
    import numpy as np
    import torch

    from sdtk.formats import open_model

    torch.set_num_threads(os.cpu_count() or 1)
    sample = modules[::every]
    spent = 0.0
    with open_model(tuned) as cat:
        for m in sample:
            t = cat.tensors[m["key"]]
            start = time.perf_counter()
            delta = torch.from_numpy(np.asarray(t.read(), dtype=np.float32).reshape(t.shape[0], -1))
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            k = min(m["rank"], s.shape[0])
            _ = (u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous()
            spent += time.perf_counter() - start
    with open_model(tuned) as cat:
        shapes = {m["key"]: cat.tensors[m["key"]].shape for m in modules}
    total_cost = sum(svd_cost(shapes[m["key"]]) for m in modules)
    sample_cost = sum(svd_cost(shapes[m["key"]]) for m in sample)
    return {"sampled": len(sample), "of": len(modules), "sample_s": spent, "estimate_s": spent * total_cost / sample_cost}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--sample", type=int, default=12, help="time the anchor on every N-th module")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension (a quick check of the bench itself)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_extract.md"))
    args = ap.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="xbench-"))
    folder.mkdir(parents=True, exist_ok=True)
    lay = load_layout(LAYOUT).with_dtype("float16")
    if args.scale > 1:
        from sdtk.samples import Layout

        lay = Layout(lay.name, lay.description, tuple((k, tuple(max(1, d // args.scale) for d in s), t) for k, s, t in lay.tensors))
    base, tuned, out = folder / "base.safetensors", folder / "tuned.safetensors", folder / "extracted.safetensors"
    try:
        write_sparse_safetensors(base, lay)
        t0 = time.perf_counter()
        write_safetensors(tuned, layout_plan(lay, values="random", seed=1), {}, overwrite=True)
        print(f"built the tuned file ({tuned.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        for p in (base, tuned):  # warm the page cache as a repeated run would find it
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        sd = measure([sys.executable, "-m", "sdtk", "lora", "extract", str(tuned), str(base), "--rank", str(args.rank),
                      "--components", "unet", "-o", str(out)], "sdtk lora extract", env=env)
        print(sd.summary(), flush=True)
        listing = subprocess.run([sys.executable, "-c", _LIST_MODULES, str(out)], env=env, capture_output=True, text=True, check=True)
        modules = json.loads(listing.stdout)
        anchor = anchor_seconds(tuned, modules, args.sample)
        print(f"anchor (full SVD per module): {anchor['sample_s']:.1f} s on {anchor['sampled']} of {anchor['of']} modules, "
              f"estimated {anchor['estimate_s']:.0f} s for all", flush=True)
        facts = machine_facts(str(folder))
        lines = [f"# `sdtk lora extract` rank {args.rank}, full-size SDXL pair ({time.strftime('%Y-%m-%d')})", "",
                 "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), "",
                 "| what | wall | peak anon RSS | note |", "|---|---|---|---|",
                 f"| sdtk lora extract --rank {args.rank} --components unet ({len(modules)} modules, randomized SVD, 2 subspace iterations) "
                 f"| {sd.wall_s:.1f} s | {sd.peak_rss_anon / 2**20:.0f} MB | exit {sd.returncode}; user {sd.user_s:.0f} s |",
                 f"| anchor: full SVD per module (torch.linalg.svd fp32, kohya's algorithm) | ~{anchor['estimate_s']:.0f} s (estimated) "
                 f"| - | measured {anchor['sample_s']:.1f} s on {anchor['sampled']} of {anchor['of']} modules, scaled by m*n*min(m,n) |",
                 "", f"Ratio: sdtk takes {sd.wall_s / anchor['estimate_s']:.2f}x the anchor's SVD time alone (the anchor's reads not counted).", ""]
        Path(args.out).write_text("\n".join(lines))
        print("\n".join(lines))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for p in (base, tuned, out):
                if p.exists():
                    p.unlink()
    return 0


# the modules sdtk wrote: {key of the tuned weight, rank}, from the LoRA's own keys and the base's alias table
_LIST_MODULES = r"""
import json, sys
from sdtk.formats import open_model
from sdtk.samples import load_layout
from sdtk.architectures.lora_keys import build_alias_table
shapes = {k: tuple(s) for k, s, _ in load_layout("sdxl-base").tensors}
table = build_alias_table(shapes)
out = []
with open_model(sys.argv[1]) as cat:
    for k, t in cat.tensors.items():
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            target = table.resolve(name)
            out.append({"key": target.weight, "rank": t.shape[0]})
print(json.dumps(out))
"""

if __name__ == "__main__":
    sys.exit(main())
