"""`sdtk convert --to gguf` benchmark.

Part 1, FLUX.1-dev (the real 780-tensor layout, bf16, 23.8 GB) to Q8_0, Q5_K_S and Q4_K_S: output
sizes against city96's published files (12.7 / 8.29 / 6.81 GB, HF city96/FLUX.1-dev-gguf) and peak
anonymous RSS (target < 1 GB). The input is sparse (zero-filled), so the figures are about the
container and the streaming (sizes depend only on the types chosen), not quantization speed.

Part 2, the SD1.5 UNet (fp16, 1.72 GB, real non-zero values: bench_merge.real_data_plan) to Q8_0,
side by side in one run with the gguf-py way: read every tensor into RAM (safetensors numpy
`load_file`), `gguf.quants.quantize` each with the same types sdtk chooses, `GGUFWriter`. Both
outputs must be byte-identical.

Usage:  python bench/bench_gguf.py [--dir DIR] [--skip-flux] [--skip-sd15]
Writes bench/results/gguf.md; deletes its multi-GB files at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from _measure import MB, machine_facts, measure, measure_python  # noqa: E402

PUBLISHED_GB = {"Q8_0": 12.7, "Q5_K_S": 8.29, "Q4_K_S": 6.81}  # HF city96/FLUX.1-dev-gguf listing


def sdtk_convert(src: Path, dst: Path, quant: str):
    return [sys.executable, "-m", "sdtk", "convert", str(src), "--to", "gguf", "--quant", quant, "-o", str(dst)]


def gguf_py_way(src: str, dst: str) -> int:
    """Read all, quantize with gguf-py, write with GGUFWriter (the types from sdtk's plan)."""
    sys.path.insert(0, str(REPO / "src"))
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from sdtk.formats import open_model
    from sdtk.ops.to_gguf import plan_gguf

    with open_model(src) as cat:
        plan = plan_gguf(cat, "Q8_0")
    sd = load_file(src)
    w = gguf.GGUFWriter(dst, arch=plan.arch.name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, v in plan.kv.items():
        if key.startswith("comfy.gguf.orig_shape."):
            w.add_array(key, v.value)
    prefix = plan.prefix or ""
    for t in plan.tensors:
        data = sd[prefix + t.name].astype(np.float32).reshape(tuple(reversed(t.ne)))
        qt = gguf.GGMLQuantizationType[t.ggml_type.name]
        w.add_tensor(t.name, gguf.quants.quantize(data, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return 0


def flux_part(work: Path, lines: list) -> None:
    from sdtk.samples import load_layout, write_sparse_safetensors

    src = work / "flux1-dev-bf16.safetensors"
    write_sparse_safetensors(src, load_layout("flux1-dev"))
    lines += ["## FLUX.1-dev bf16 (23.8 GB, sparse) -> GGUF", "",
              "| quant | sdtk size | published | difference | wall | peak anon RSS | peak file RSS |", "|---|---|---|---|---|---|---|"]
    for quant, gb in PUBLISHED_GB.items():
        dst = work / f"flux1-dev-{quant}.gguf"
        m = measure(sdtk_convert(src, dst, quant), f"sdtk {quant}", env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        if m.returncode != 0:
            raise SystemExit(f"sdtk failed: {m.stderr_tail}")
        size = dst.stat().st_size
        import gguf

        n = len(gguf.GGUFReader(str(dst)).tensors)
        lines.append(f"| {quant} | {size:,} B ({size / 1e9:.3f} GB, {n} tensors) | {gb} GB | {100 * (size / 1e9 - gb) / gb:+.2f} % | "
                     f"{m.wall_s:.1f} s | {m.peak_rss_anon / MB:.0f} MB | {m.peak_rss_file / MB:.0f} MB |")
        print(lines[-1], flush=True)
        dst.unlink()
    src.unlink()
    lines.append("")


def sd15_part(work: Path, lines: list) -> None:
    from bench_merge import real_data_plan

    from sdtk.formats.safetensors import write_safetensors
    from sdtk.samples import load_layout

    layout = load_layout("sd15-emaonly").with_dtype("float16").without(lambda k: not k.startswith("model.diffusion_model."))
    src = work / "sd15-unet-fp16.safetensors"
    write_safetensors(src, real_data_plan(layout, 1), {}, overwrite=True)
    subprocess_cat(src)
    a, b = work / "sdtk-Q8_0.gguf", work / "ggufpy-Q8_0.gguf"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    ms = measure(sdtk_convert(src, a, "Q8_0"), "sdtk", env=env)
    subprocess_cat(src)
    mg = measure_python("bench_gguf:gguf_py_way", [str(src), str(b)], "gguf-py way", env=dict(env, PYTHONPATH=f"{BENCH}:{REPO / 'src'}"))
    for m in (ms, mg):
        if m.returncode != 0:
            raise SystemExit(f"{m.label} failed: {m.stderr_tail}")
    same = a.read_bytes() == b.read_bytes()
    lines += [f"## SD1.5 UNet fp16 ({src.stat().st_size / 1e9:.2f} GB, real values) -> Q8_0", "",
              "| way | wall | user CPU | peak anon RSS | output |", "|---|---|---|---|---|"]
    for m, path in ((ms, a), (mg, b)):
        lines.append(f"| {m.label} | {m.wall_s:.2f} s | {m.user_s:.2f} s | {m.peak_rss_anon / MB:.0f} MB | {path.stat().st_size:,} B |")
        print(lines[-1], flush=True)
    lines += ["", f"Outputs byte-identical: {'yes' if same else 'NO'}. Speed-up: {mg.wall_s / ms.wall_s:.2f}x wall, "
                  f"{(mg.user_s + mg.sys_s) / max(ms.user_s + ms.sys_s, 1e-9):.2f}x CPU.", ""]
    print(lines[-2], flush=True)
    for p in (a, b, src):
        p.unlink()


def subprocess_cat(path: Path) -> None:
    import subprocess

    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--label", default="loaded", help="idle or loaded (other jobs running)")
    ap.add_argument("--out", default=str(BENCH / "results" / "gguf.md"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdtk-bench-gguf-", dir=args.dir))
    load = os.getloadavg()
    lines = ["# convert --to gguf", "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, **{args.label}** "
             f"(load average {load[0]:.1f} at the start); script `bench/bench_gguf.py`.", ""]
    lines += [f"- {k}: {v}" for k, v in machine_facts(str(work)).items()] + [""]
    try:
        if not args.skip_flux:
            flux_part(work, lines)
        if not args.skip_sd15:
            sd15_part(work, lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
