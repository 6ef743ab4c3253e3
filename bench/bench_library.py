"""Benchmark `sdtk library scan`: first scan and rescans of a library of 1,000 model files.

A ComfyUI-style tree of `--files` small safetensors files (10 folders, a Civitai sidecar and a
preview beside every tenth) is made in a temporary folder. Each scan runs as the real command
(`python -m sdtk library scan ROOT --db DB --json --quiet`) through `_measure.py`; reported: the
scan's own time (from its JSON report), the whole command's wall time (interpreter start-up
included) and peak anonymous RSS. Target: a rescan of 1,000 unchanged files in under 2 s.
Results: bench/results/library.md.

    python bench/bench_library.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]

from _measure import MB, machine_facts, measure  # noqa: E402


def tiny_lora_bytes(rng) -> bytes:
    """A tiny but real kohya LoRA (one module: down, up, alpha; fp16), distinct per call."""
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down = rng.standard_normal((4, 32)).astype("<f2").tobytes()
    up = rng.standard_normal((32, 4)).astype("<f2").tobytes()
    header = {"__metadata__": {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"},
              f"{module}.lora_down.weight": {"dtype": "F16", "shape": [4, 32], "data_offsets": [0, 256]},
              f"{module}.lora_up.weight": {"dtype": "F16", "shape": [32, 4], "data_offsets": [256, 512]},
              f"{module}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [512, 516]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + down + up + struct.pack("<f", 4.0)


def make_tree(root: Path, count: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    folders = ["checkpoints", "loras", "vae", "embeddings", "controlnet", "upscale_models", "text_encoders",
               "diffusion_models", "clip_vision", "hypernetworks"]
    for i in range(count):
        folder = root / "models" / folders[i % len(folders)] / f"group{i // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"model_{i:05d}.safetensors"
        p.write_bytes(tiny_lora_bytes(rng))
        if i % 10 == 0:
            (folder / f"model_{i:05d}.civitai.info").write_text(json.dumps(
                {"id": i, "modelId": i, "baseModel": "SDXL 1.0", "trainedWords": [f"word{i}"], "model": {"name": f"m{i}", "type": "LORA"}}))
            (folder / f"model_{i:05d}.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        paths.append(p)
    return paths


def scan(root: Path, db: Path, label: str):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = db.with_suffix(".report.json")
    code = f"import sys; sys.stdout = open({str(out)!r}, 'w'); from sdtk.cli.main import main; main(sys.argv[1:])"
    m = measure([sys.executable, "-c", code, "library", "scan", str(root), "--db", str(db), "--json", "--quiet"],
                label=label, env=env)
    if not m.ok:
        raise SystemExit(f"{label} failed: {m.stderr_tail}")
    return m, json.loads(out.read_text())


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the temporary files on kill too
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "library.md"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdtk-bench-library-", dir=args.dir))
    try:
        root = work / "ComfyUI"
        paths = make_tree(root, args.files)
        db = work / "library.sqlite3"
        first, first_rep = scan(root, db, "first scan")
        rescans = [scan(root, db, "rescan") for _ in range(args.repeat)]
        for p in paths[:10]:  # ten files change (new mtime): exactly those are read again
            os.utime(p, ns=(time.time_ns(), time.time_ns()))
        touched, touched_rep = scan(root, db, "rescan, 10 changed")
        scan_s = min(r["seconds"] for _, r in rescans)  # best of N (shared machine)
        wall_s = min(m.wall_s for m, _ in rescans)
        lines = [
            "# `sdtk library scan`: first scan and rescans",
            "",
            f"{args.files:,} tiny LoRA safetensors files (kohya keys, fp16) in a ComfyUI-style tree (10 folders), a Civitai sidecar and a preview",
            "beside every tenth. Each scan is the real command `sdtk library scan ROOT --db DB --json --quiet`",
            "in a fresh interpreter; 'scan' is the scan's own time from its report, 'command' the whole process",
            f"(interpreter start-up and imports included). Rescans: best of {args.repeat}.",
            "",
            "| scan | files read (hashed) | unchanged | scan (s) | command (s) | command CPU s | peak anon RSS |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| first scan | {first_rep['hashed']} | {first_rep['unchanged']} | {first_rep['seconds']:.2f} | {first.wall_s:.2f} | {first.user_s + first.sys_s:.2f} | {first.peak_rss_anon / MB:.0f} MB |",
            f"| rescan, nothing changed | {rescans[0][1]['hashed']} | {rescans[0][1]['unchanged']} | {scan_s:.2f} | {wall_s:.2f} | {min(m.user_s + m.sys_s for m, _ in rescans):.2f} | {max(m.peak_rss_anon for m, _ in rescans) / MB:.0f} MB |",
            f"| rescan, 10 files touched | {touched_rep['hashed']} | {touched_rep['unchanged']} | {touched_rep['seconds']:.2f} | {touched.wall_s:.2f} | {touched.user_s + touched.sys_s:.2f} | {touched.peak_rss_anon / MB:.0f} MB |",
            "",
            f"Target: rescan of {args.files:,} unchanged files in under 2 s: scan {scan_s:.2f} s, whole command {wall_s:.2f} s "
            f"({'met' if wall_s < 2 else 'NOT met'}).",
            "",
            f"Load average when the run ended: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the machine is shared). Most of a",
            "command's time is the interpreter starting and importing sdtk (numpy, ml_dtypes, typer, every command module).",
            "",
            "## Machine",
            "",
        ]
        lines += [f"- {k}: {v}" for k, v in machine_facts(str(work)).items()]
        lines += ["", f"Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python bench/bench_library.py`."]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
