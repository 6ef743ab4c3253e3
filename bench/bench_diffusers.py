"""Full-size SDXL base (6.94 GB fp16) single file -> diffusers folder -> single file, beside
`cp && sync` and beside diffusers' own conversion.

In one run, on the same input:
  cp && sync       `cp --sparse=never IN COPY && sync`: the physical limit for "read it, write it"
  sdtk to folder   `sdtk convert IN --to diffusers -o FOLDER --no-source-hash && sync`
  sdtk back        `sdtk convert FOLDER -o BACK.safetensors && sync` (then BACK is compared with IN
                   byte for byte, not measured)
  diffusers        `StableDiffusionXLPipeline.from_single_file(IN, config=FOLDER (the one sdtk
                   wrote), local_files_only=True, torch_dtype=float16)` + `save_pretrained(DIR)` +
                   `os.sync()`, with HF_HUB_OFFLINE=1 (diffusers ships no configs, reference
                   diffusers-interop.md section 3). diffusers has no folder -> single file converter
                   in its wheel (the scripts/ converters are not shipped), so it has no "back" line.
Each is measured with bench/_measure.py (wall, peak anonymous RSS = RssAnon summed over the
process tree, peak file-backed RSS, VmHWM). Targets (issue 13): peak anonymous RSS < 500 MB and
wall <= 1.3x `cp && sync` for both sdtk directions.

Input: the real `sdxl-base` layout (2515 tensors, sdtk.real_layouts), full size, fp16, written
sparse by sdtk.samples.write_sparse_safetensors (real header, zero-filled data, real position_ids),
then made dense with `cp --sparse=never` (not measured): sdtk copies spans with copy_file_range and
keeps a sparse source's holes, so a sparse input would let it skip writing. The figures are about
moving and renaming bytes, not about their values. The input is read once before the runs (warm
page cache), and the folder once before `sdtk back` (sdtk writes it past the page cache, so it would
otherwise be read from disk while cp's input is in memory: the way back measured 1.9-4.0x that way,
with its CPU time beside cp's); every command ends with sync, so dirty pages count.
--cold adds, per round, the way back from a cold folder (its pages dropped with
POSIX_FADV_DONTNEED) beside `cat` of the folder's weight files into one file && sync, also cold.
Checks: BACK == IN byte for byte; diffusers' saved unet/vae/text encoders hold the same tensor
names and shapes as sdtk's folder (transformers may save CLIP keys without `text_model.`).

Usage:  python bench/bench_diffusers.py [--dir DIR] [--repeat 3] [--no-diffusers] [--cold] [--label TEXT]
Needs ~21 GB of free disk at peak (input, copy or back, folder, diffusers' folder); deletes
everything it wrote. Writes bench/results/diffusers.md.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from _measure import MB, machine_facts, measure, measure_python  # noqa: E402

RSS_LIMIT = 500 * MB
TARGET_RATIO = 1.3


def diffusers_way(src: str, config: str, out: str) -> int:
    """diffusers' own single file -> folder, offline, with the configs of sdtk's folder."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(src, config=config, local_files_only=True,
                                                      torch_dtype=torch.float16)
    pipe.save_pretrained(out)
    os.sync()
    return 0


def _keys(folder: Path):
    """{component: {name: shape}} of a diffusers folder's safetensors weights (headers only)."""
    from sdtk.formats.safetensors import read_safetensors

    out = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files = sorted((folder / comp).glob("*.safetensors"))
        names = {}
        for f in files:
            cat = read_safetensors(f)
            try:
                names.update({k: tuple(t.shape) for k, t in cat.tensors.items()})
            finally:
                cat.close()
        if comp.startswith("text_encoder"):  # transformers >= 5.6 may save CLIPTextModel flat
            names = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): s
                     for k, s in names.items()}
        out[comp] = names
    return out


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def weight_files(folder: Path):
    return sorted(p for p in folder.rglob("*.safetensors"))


def warm_folder(folder: Path) -> None:
    for p in weight_files(folder):
        warm(p)


def drop_folder(folder: Path) -> None:
    """Drop the folder's (clean) pages from the page cache (POSIX_FADV_DONTNEED, no root needed)."""
    for p in weight_files(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp folder)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' own conversion")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of cp / sdtk to / sdtk back")
    ap.add_argument("--cold", action="store_true", help="also the way back from a cold folder, beside a cold cat of its files")
    ap.add_argument("--label", default="loaded (other engineers' jobs running)")
    ap.add_argument("--out", default=str(BENCH / "results" / "diffusers.md"))
    args = ap.parse_args()
    from sdtk.samples import load_layout, write_sparse_safetensors

    work = Path(tempfile.mkdtemp(prefix="sdtk-diffusers-bench-", dir=args.dir))
    facts = machine_facts(str(work))
    rows, checks = [], []
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    try:
        sparse = work / "sdxl-base-sparse.safetensors"
        size = write_sparse_safetensors(sparse, load_layout("sdxl-base").with_dtype("float16"))
        # sdtk keeps a sparse source's holes (as cp --sparse=auto does), so a sparse input would
        # flatter it: every command reads a dense copy (real blocks on disk, zero-valued)
        src = work / "sdxl-base.safetensors"
        subprocess.run(["cp", "--sparse=never", str(sparse), str(src)], check=True)
        sparse.unlink()
        subprocess.run(["sync"], check=True)
        warm(src)
        copy, folder, back = work / "copy.safetensors", work / "folder", work / "back.safetensors"
        for run in range(args.repeat):  # interleaved, so each round sees the same machine state
            cp = measure(["sh", "-c", f"cp --sparse=never '{src}' '{copy}' && sync"], "cp && sync")
            copy.unlink()
            if folder.exists():
                shutil.rmtree(folder)
                subprocess.run(["sync"], check=True)
            to = measure(["sh", "-c", f"'{sys.executable}' -m sdtk convert '{src}' --to diffusers -o '{folder}' "
                          f"--no-source-hash && sync"], "sdtk convert FILE --to diffusers && sync", env=env)
            # the folder was just written past the page cache (sdtk.directio): warm it, as the
            # input of cp and of "to" is warm, so both ways are measured from a warm input
            warm_folder(folder)
            bk = measure(["sh", "-c", f"'{sys.executable}' -m sdtk convert '{folder}' -o '{back}' && sync"],
                         "sdtk convert FOLDER -o FILE && sync", env=env)
            extra = []
            if args.cold:  # the folder's pages dropped: reading it from disk, beside a cold cat of its files
                if back.exists():
                    back.unlink()
                drop_folder(folder)
                parts = " ".join(f"'{p}'" for p in weight_files(folder))
                extra.append(measure(["sh", "-c", f"cat {parts} > '{copy}' && sync"], "cold: cat folder's files > FILE && sync"))
                copy.unlink()
                drop_folder(folder)
                extra.append(measure(["sh", "-c", f"'{sys.executable}' -m sdtk convert '{folder}' -o '{back}' --overwrite && sync"],
                                     "cold: sdtk convert FOLDER -o FILE && sync", env=env))
            for m in (cp, to, bk, *extra):
                rows.append((run + 1, m))
                print(f"round {run + 1}:", m.summary(), m.stderr_tail[-300:] if not m.ok else "", flush=True)
            if run == 0:
                same = back.exists() and filecmp.cmp(src, back, shallow=False)
                checks.append(f"back.safetensors byte-identical to the input: {'yes' if same else 'NO'}")
            if back.exists():
                back.unlink()
            subprocess.run(["sync"], check=True)
            warm(src)
        if not args.no_diffusers:
            dout = work / "diffusers-out"
            dm = measure_python("bench_diffusers:diffusers_way", [str(src), str(folder), str(dout)],
                                "diffusers from_single_file(config=sdtk folder) + save_pretrained + sync",
                                env=dict(env, PYTHONPATH=f"{BENCH}{os.pathsep}{REPO / 'src'}"))
            rows.append((1, dm))
            print(dm.summary(), dm.stderr_tail[-500:] if not dm.ok else "", flush=True)
            if dm.ok:
                ours, theirs = _keys(folder), _keys(dout)
                for comp in ours:
                    eq = ours[comp] == theirs.get(comp)
                    checks.append(f"diffusers' `{comp}/` has the same tensor names and shapes as sdtk's: "
                                  f"{'yes' if eq else 'NO'} ({len(ours[comp])} vs {len(theirs.get(comp, {}))})")
            shutil.rmtree(dout, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cps = {r: m for r, m in rows if m.label == "cp && sync"}
    lines = ["# diffusers folders: full-size SDXL base both ways", "",
             "Generated by `python bench/bench_diffusers.py` (method in its docstring).", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), f"Run: {args.label}", "",
             f"Input: `sdxl-base` layout, fp16, {size / 1e9:.2f} GB, dense (zero-valued, built from the sparse layout "
             f"file); page cache warm. {args.repeat} interleaved rounds (cp, sdtk to, sdtk back); ratios are to the "
             "`cp && sync` of the same round (cold lines: to the cold `cat` of the folder's files); the folder is read "
             "once before `sdtk back` (it was written past the page cache); diffusers ran once, after the last round.", "",
             "| round | step | wall | vs cp && sync | peak anon RSS | peak file RSS | VmHWM | user + sys CPU |",
             "|---|---|---|---|---|---|---|---|"]
    colds = {r: m for r, m in rows if m.label.startswith("cold: cat")}
    for r, m in rows:
        base = (colds[r] if m.label.startswith("cold:") else
                cps.get(r) if m.label.startswith(("cp", "sdtk")) else cps[max(cps)])
        lines.append(f"| {r} | {m.label} | {m.wall_s:.1f} s{'' if m.ok else ' (failed)'} | {m.wall_s / base.wall_s:.2f}x | "
                     f"{m.peak_rss_anon / MB:.0f} MB | {m.peak_rss_file / MB:.0f} MB | {m.vm_hwm / MB:.0f} MB | "
                     f"{m.user_s + m.sys_s:.1f} s |")
    lines += ["", "| step | median ratio to cp && sync (min-max) | max peak anon RSS |", "|---|---|---|"]
    verdict = []
    labels = ["sdtk convert FILE --to diffusers && sync", "sdtk convert FOLDER -o FILE && sync"]
    for label in labels + (["cold: sdtk convert FOLDER -o FILE && sync"] if colds else []):
        ms = [(r, m) for r, m in rows if m.label == label]
        ratios = sorted(m.wall_s / (colds if label.startswith("cold:") else cps)[r].wall_s for r, m in ms)
        med = statistics.median(ratios)
        anon = max(m.peak_rss_anon for _, m in ms)
        lines.append(f"| {label} | {med:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) | {anon / MB:.0f} MB |")
        if label in labels:  # the cold line is to the cold cat, shown beside the targets
            verdict.append((med <= TARGET_RATIO, anon < RSS_LIMIT))
    lines += ["", "Targets (issue 13) for sdtk: peak anonymous RSS < 500 MB: "
              + ("met" if all(v[1] for v in verdict) else "NOT met")
              + f"; median wall <= {TARGET_RATIO}x cp && sync: "
              + ("met" if all(v[0] for v in verdict) else "NOT met") + ".", ""]
    lines += [f"- {c}" for c in checks]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
