"""`sdtk lora apply` at full size: a kohya LoRA with LoCon and LoHa modules (attention, ff,
proj_in/out, 3x3 resnet convs, text encoder) baked into a 2.1 GB fp16 SD1.5 checkpoint, and an
SDXL LoRA (SGM names, both text encoders incl. OpenCLIP q/k/v slices) into a 6.9 GB fp16 SDXL
checkpoint, beside `cp && sync` of the same output size.

Usage:
  python bench/bench_lora_apply.py [--dir /tmp/lbench] [--rank 16] [--scale 1] [--out bench/results/lora_apply.md]

Bases are built from the real layouts (header + zero-valued data), written dense (`cp --sparse=never`,
not measured) so that sdtk writes every byte, as on a real model; LoRAs are real random values. Peak anonymous RSS is what the < 500 MB target is about (bench/_measure.py).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import machine_facts, measure  # noqa: E402
from sdtk.architectures.lora_keys import sd_unet_to_diffusers, under  # noqa: E402
from sdtk.formats.safetensors import write_safetensors  # noqa: E402
from sdtk.samples import load_layout, write_sparse_safetensors  # noqa: E402
from sdtk.tensors import from_array  # noqa: E402

UNET = "model.diffusion_model."
ATTN = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")
RESNET_CONV = re.compile(r"\.(in_layers\.2|out_layers\.3)$")
TE_HF = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def _scaled(layout, scale):
    if scale == 1:
        return layout
    from sdtk.samples import Layout

    return Layout(layout.name, layout.description,
                  tuple((k, tuple(max(1, d // scale) for d in s), t) for k, s, t in layout.tensors))


def lora_tensors(shapes, family: str, rank: int, rng):
    """kohya names: SD1 UNet in diffusers layout, SDXL in SGM layout; LoCon for attention, LoHa for
    3x3 resnet convs; TE LoRA (HF names; SDXL te2 q/k/v land on OpenCLIP in_proj row thirds)."""
    out = {}
    rnd = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float16)  # noqa: E731
    unet_mods = {k[len(UNET):-len(".weight")]: v for k, v in shapes.items() if k.startswith(UNET) and k.endswith(".weight")}
    names = sd_unet_to_diffusers(unet_mods) if family == "sd1" else {m: m for m in unet_mods}
    for ldm, shape in unet_mods.items():
        name = "lora_unet_" + under(names.get(ldm, ldm))
        if ATTN.search(ldm):
            inn = int(np.prod(shape[1:]))
            out[name + ".lora_down.weight"] = rnd(rank, *shape[1:])
            out[name + ".lora_up.weight"] = rnd(shape[0], rank, *((1,) * (len(shape) - 2)))
            out[name + ".alpha"] = np.array(rank / 2, dtype=np.float16)
        elif RESNET_CONV.search(ldm) and len(shape) == 4:
            for i in (1, 2):
                out[name + f".hada_w{i}_a"] = rnd(shape[0], rank // 2)
                out[name + f".hada_w{i}_b"] = rnd(rank // 2, int(np.prod(shape[1:])))
            out[name + ".alpha"] = np.array(rank / 4, dtype=np.float16)
    tes = ([("cond_stage_model.transformer.", "lora_te_")] if family == "sd1" else
           [("conditioner.embedders.0.transformer.", "lora_te1_")])
    for prefix, lp in tes:
        for k, shape in shapes.items():
            if k.startswith(prefix) and k.endswith(".weight") and TE_HF.search(k[:-7]):
                name = lp + under(k[len(prefix):-len(".weight")])
                out[name + ".lora_down.weight"] = rnd(rank, shape[1])
                out[name + ".lora_up.weight"] = rnd(shape[0], rank)
                out[name + ".alpha"] = np.array(rank, dtype=np.float16)
    if family == "sdxl":
        pat = re.compile(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
        for k, shape in shapes.items():
            hit = pat.match(k)
            if not hit:
                continue
            n, what = hit.groups()
            layer = f"lora_te2_text_model_encoder_layers_{n}_"
            parts = ({"attn.in_proj_weight": [("self_attn_q_proj", shape[0] // 3), ("self_attn_k_proj", shape[0] // 3), ("self_attn_v_proj", shape[0] // 3)],
                      "attn.out_proj.weight": [("self_attn_out_proj", shape[0])], "mlp.c_fc.weight": [("mlp_fc1", shape[0])],
                      "mlp.c_proj.weight": [("mlp_fc2", shape[0])]})[what]
            for suffix, rows in parts:
                out[layer + suffix + ".lora_down.weight"] = rnd(rank, shape[1])
                out[layer + suffix + ".lora_up.weight"] = rnd(rows, rank)
                out[layer + suffix + ".alpha"] = np.array(rank, dtype=np.float16)
    return out


def run_case(folder: Path, layout_name: str, family: str, rank: int, scale: int, runs: int):
    lay = _scaled(load_layout(layout_name).with_dtype("float16"), scale)
    base = folder / f"{layout_name}-fp16.safetensors"
    sparse = folder / f"{layout_name}-sparse.safetensors"
    write_sparse_safetensors(sparse, lay)
    # made dense (not measured): sdtk copies untouched spans with copy_file_range, which keeps a
    # sparse source's holes, so a sparse base would let it skip writing most of the output
    subprocess.run(["cp", "--sparse=never", str(sparse), str(base)], check=True)
    sparse.unlink()
    subprocess.run(["sync"], check=True)
    shapes = {k: tuple(s) for k, s, _ in lay.tensors}
    lora = lora_tensors(shapes, family, rank, np.random.default_rng(0))
    lora_path = folder / f"{family}-lora.safetensors"
    write_safetensors(lora_path, [from_array(k, v) for k, v in lora.items()], {"ss_base_model_version": "sd_v1" if family == "sd1" else "sdxl_base_v1-0"}, overwrite=True)
    out = folder / "out.safetensors"
    copy = folder / "copy.safetensors"
    # warm the page cache for both contenders
    for p in (base, lora_path):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cps, sds, size = [], [], 0
    for _ in range(runs):  # interleaved: a disk or page-cache hiccup falls on both contenders
        cps.append(measure(["sh", "-c", f"cp --sparse=never '{base}' '{copy}' && sync"], "cp && sync"))
        copy.unlink()
        subprocess.run(["sync"], check=True)
        sds.append(measure([sys.executable, "-m", "sdtk", "lora", "apply", str(base), f"{lora_path}:0.8:0.5", "-o", str(out)],
                           "sdtk lora apply", env=env))
        if out.exists():
            size = out.stat().st_size
            out.unlink()
        subprocess.run(["sync"], check=True)
    for p in (out, base):
        if p.exists():
            p.unlink()
    modules = len({k.rsplit(".", 2)[0] for k in lora if k.endswith((".lora_down.weight", ".hada_w1_a"))})
    return {"case": f"{layout_name} fp16 ({size / 1e9:.2f} GB) + rank-{rank} LoRA ({modules} modules, {lora_path.stat().st_size / 1e6:.0f} MB)",
            "cp": cps, "sdtk": sds}


def _median(ms):
    return sorted(ms, key=lambda m: m.wall_s)[len(ms) // 2]


def _spread(ms):
    walls = sorted(m.wall_s for m in ms)
    return f"{_median(ms).wall_s:.2f} s ({walls[0]:.2f}-{walls[-1]:.2f})" if len(ms) > 1 else f"{walls[0]:.2f} s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs of each contender; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_apply.md"))
    ap.add_argument("--label", default="loaded (other engineers' jobs running)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sdtk-lora-bench-", dir=args.dir))
    rows = []
    try:
        for layout, family in (("sd15-emaonly", "sd1"), ("sdxl-base", "sdxl")):
            r = run_case(folder, layout, family, args.rank, args.scale, args.runs)
            rows.append(r)
            for c, d in zip(r["cp"], r["sdtk"]):
                print(r["case"], "|", c.summary(), "|", d.summary(), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    facts = machine_facts(str(folder.parent))
    lines = ["# `sdtk lora apply` at full size", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), f"Run: {args.label}", "",
             f"Each figure: the median of {args.runs} interleaved runs (min-max in brackets).", "",
             "| case | cp && sync | sdtk lora apply | ratio (medians) | sdtk CPU (user+sys) | sdtk peak anon RSS |", "|---|---|---|---|---|---|"]
    for r in rows:
        cp, sd = _median(r["cp"]), _median(r["sdtk"])
        failed = [m for m in r["sdtk"] if not m.ok]
        lines.append(f"| {r['case']} | {_spread(r['cp'])} | {_spread(r['sdtk'])}{' (failed: ' + failed[0].stderr_tail[-200:] + ')' if failed else ''} | "
                     f"{sd.wall_s / cp.wall_s:.2f}x | {sd.user_s + sd.sys_s:.2f} s | {max(m.peak_rss_anon for m in r['sdtk']) / (1 << 20):.0f} MB |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
