"""`sdtk convert`: thin CLI over sdtk.ops.convert (options, progress bars, words, JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from sdtk.cli.common import console, err_console, error_line, esc, print_json
from sdtk.errors import EXIT_BAD_INPUT, EXIT_OK, SdtkError, UsageError

if TYPE_CHECKING:  # imported when the command runs (start-up: `sdtk --help` needs neither)
    from sdtk.ops.convert import ConvertOptions

# `--to`: what convert writes. One row per target: (help, handler name in this module). Other
# targets (e.g. gguf) add a row and a handler; the default writes a single safetensors file.
CONVERT_TARGETS = {
    "safetensors": ("a single .safetensors file (default)", None),
    "diffusers": ("a diffusers folder (model_index.json + components) that loads offline", "_to_diffusers"),
    "gguf": ("the diffusion model as GGUF, as city96's GGUF tools write it (with --quant)", None),  # sdtk.ops.convert
    "fp8-scaled": ("ComfyUI's per-layer scaled fp8 (weight_scale + comfy_quant)", None),  # sdtk.ops.convert
    "nf4": ("bitsandbytes NF4 Linear weights, the layout Forge loads (its FLUX NF4 files)", None),  # sdtk.ops.convert
    "fp4": ("bitsandbytes FP4, the same layout with bitsandbytes' FP4 code", None),  # sdtk.ops.convert
}


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        source: Path = typer.Argument(..., help="Model file (.ckpt/.pt/.pth/.bin/.safetensors), or a folder of them."),
        output_arg: Optional[Path] = typer.Argument(None, metavar="[OUT]", help="Output .safetensors file (same as -o)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file, or folder (batch, --extract). Default: beside the input, named after what was done."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32|fp16|bf16|fp8-e4m3fn|fp8-e5m2 for floating tensors (integers, position ids and markers are never cast; fp8: the UNet/DiT only, VAE and text encoders stay 16-bit)."),
        unet_dtype: Optional[str] = typer.Option(None, "--unet-dtype", help="Precision of the UNet/DiT (overrides --dtype)."),
        vae_dtype: Optional[str] = typer.Option(None, "--vae-dtype", help="Precision of the VAE (overrides --dtype)."),
        te_dtype: Optional[str] = typer.Option(None, "--te-dtype", help="Precision of the text encoders (overrides --dtype)."),
        allow_overflow: bool = typer.Option(False, "--allow-overflow", help="Write even if values do not fit the target dtype (inf in fp16/bf16/e5m2; saturated to +-448 in fp8-e4m3fn)."),
        ema: Optional[str] = typer.Option(None, "--ema", help="keep|drop|use: what to do with an EMA copy (use: EMA weights become the model weights)."),
        prune: bool = typer.Option(False, "--prune", help="Drop training state, the EMA copy (unless --ema keep) and unknown keys; markers are kept."),
        keep_unknown: bool = typer.Option(False, "--keep-unknown", help="With --prune: keep keys the architecture tables do not know."),
        fix_clip: bool = typer.Option(False, "--fix-clip", help="Reset CLIP position_ids to 0..76 int64; rename NovelAI-style CLIP keys."),
        bake_vae: Optional[Path] = typer.Option(None, "--bake-vae", help="Bake this VAE file (LDM or diffusers layout) into the model."),
        extract: List[str] = typer.Option([], "--extract", help="Write parts as stand-alone files: vae, unet, clip-l, clip-g, open-clip-h, t5xxl, text-encoders (repeat or comma-separate)."),
        replace_parts: List[str] = typer.Option([], "--replace", help="COMPONENT=FILE: take a component (vae, unet, clip-l, ...) from another file."),
        preset: Optional[str] = typer.Option(None, "--for", help="generation (fp16, pruned, one weight set, CLIP fixed) or training (fp32, EMA kept)."),
        prediction_type: Optional[str] = typer.Option(None, "--prediction-type", help="State the prediction type (epsilon|v), or auto (SD2 without evidence: ComfyUI's value check decides): recorded in ModelSpec, decides the A1111 .yaml."),
        no_sidecar: bool = typer.Option(False, "--no-sidecar", help="Do not write the <name>.yaml config A1111 needs (v-prediction SD1/SD2/SDXL; the input's own yaml when it agrees)."),
        no_source_hash: bool = typer.Option(False, "--no-source-hash", help="Do not hash the input for the lineage metadata (saves reading the whole input again)."),
        hash_output: bool = typer.Option(False, "--hash-output", help="Record the output's own hash, modelspec.hash_sha256 (one more sha256 pass, over the output, while it is written)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
        replace_input: bool = typer.Option(False, "--replace-input", help="After re-reading and verifying every tensor of the output, replace the input by it (<name>.safetensors)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
        to: Optional[str] = typer.Option(None, "--to", help="What to write: " + "; ".join(f"{k}: {v[0]}" for k, v in CONVERT_TARGETS.items()) + "."),
        variant: Optional[str] = typer.Option(None, "--variant", help="--to diffusers: name the weights *.VARIANT.safetensors (fp16 also casts to fp16)."),
        tokenizers: Optional[Path] = typer.Option(None, "--tokenizers", help="--to diffusers: a folder with the T5 tokenizer to copy (sdtk ships CLIP's only)."),
        quant: Optional[str] = typer.Option(None, "--quant", help="With --to gguf: Q8_0|Q6_K|Q5_K_M|Q5_K_S|Q4_K_M|Q4_K_S|Q5_0|Q5_1|Q4_0|Q4_1|Q3_K_M|Q3_K_S|Q2_K|F16|BF16."),
        nf4_double_quant: bool = typer.Option(False, "--nf4-double-quant", help="With --to nf4/fp4: quantize the absmax scales too (8-bit, as Forge's v1 FLUX NF4 file; default: f32 absmax, as its v2)."),
        blocksize: Optional[int] = typer.Option(None, "--blocksize", help="With --to nf4/fp4: values per absmax block, 32..4096 (default 64, as Forge's files)."),
    ) -> int:
        """Convert model files to safetensors: precision, EMA, pruning, CLIP fixes, VAE baking, extraction.

        Streams tensor by tensor (memory ~ one tensor), never executes a pickle, writes atomically,
        keeps the input's metadata and adds ModelSpec + lineage."""
        if output_arg is not None and output is not None:
            raise UsageError(None, "give the output either as OUT or with -o, not both")
        output = output or output_arg
        if replace_input and output is not None:
            raise UsageError(None, "--replace-input names the output itself (<input>.safetensors); drop -o")
        from sdtk.ops.convert import ConvertOptions, convert_file, resolve_options

        if to is not None and to not in CONVERT_TARGETS:
            raise UsageError(None, f"--to {to}: choose one of {', '.join(CONVERT_TARGETS)}")
        handler = CONVERT_TARGETS[to][1] if to else None
        opts = resolve_options(ConvertOptions(
            dtype=dtype, unet_dtype=unet_dtype, vae_dtype=vae_dtype, te_dtype=te_dtype, allow_overflow=allow_overflow,
            ema=ema, prune=prune, keep_unknown=keep_unknown, fix_clip=fix_clip,
            bake_vae=str(bake_vae) if bake_vae else None, extract=list(extract), replace=list(replace_parts),
            preset=preset, prediction_type=prediction_type, sidecar=not no_sidecar,
            source_hashes=not no_source_hash, output_hash=hash_output, replace_input=replace_input, overwrite=overwrite,
            to=None if handler else to, quant=quant, nf4_double_quant=nf4_double_quant, blocksize=blocksize,
        ))
        show_progress = not json_out and err_console.is_terminal
        if handler is None and (variant or tokenizers):
            raise UsageError(None, "--variant and --tokenizers go with --to diffusers")
        if handler is not None:
            return globals()[handler](source, output, opts, json_out, show_progress, variant=variant, tokenizers=tokenizers)
        from sdtk.ops.diffusers.convert import is_folder_source

        if is_folder_source(source):
            return _from_diffusers(source, output, opts, json_out, show_progress)
        if source.is_dir():
            return _convert_folder(source, output, opts, json_out, show_progress)
        if not source.exists():
            raise SdtkError(source, "no such file")
        with _progress_display(show_progress) as progress:
            _, summary = convert_file(source, opts, output=output, progress=progress)
        if json_out:
            print_json(summary)
        else:
            _print_summary(summary)
        return EXIT_OK


def _to_diffusers(source: Path, output: Optional[Path], opts: ConvertOptions, json_out: bool, show_progress: bool,
                  variant: Optional[str] = None, tokenizers: Optional[Path] = None) -> int:
    from sdtk.ops.diffusers.convert import to_diffusers

    if not source.is_file():
        raise SdtkError(source, "no such file" if not source.exists() else "--to diffusers takes a single model file")
    with _progress_display(show_progress) as progress:
        summary = to_diffusers(source, opts, output, variant=variant, tokenizers=str(tokenizers) if tokenizers else None,
                               progress=progress)
    _print_folder_summary(summary, json_out)
    return EXIT_OK


def _from_diffusers(folder: Path, output: Optional[Path], opts: ConvertOptions, json_out: bool, show_progress: bool) -> int:
    from sdtk.ops.diffusers.convert import from_diffusers

    with _progress_display(show_progress) as progress:
        summary = from_diffusers(folder, opts, output, progress=progress)
    _print_folder_summary(summary, json_out)
    return EXIT_OK


def _print_folder_summary(summary: dict, json_out: bool) -> None:
    if json_out:
        print_json(summary)
        return
    if summary.get("to") == "diffusers":
        parts = ", ".join(f"{k} ({n})" for k, n in summary["components"].items())
        console.print(f"wrote {summary['output']}/ ({summary['pipeline']}: {parts}; {summary['bytes']:,} bytes of tensors)")
        pred = f", {summary['prediction_type']}-prediction" if summary["prediction_type"] else ""
        console.print(f"  model: {summary['architecture']}{pred}")
    else:
        console.print(f"wrote {summary['output']} ({summary['tensors']} tensors, {summary['bytes']:,} bytes)")
    for op in summary["operations"]:
        console.print(f"  done: {op}")
    for note in summary["notes"]:
        console.print(f"  {note}")


def _convert_folder(folder: Path, output: Optional[Path], opts: ConvertOptions, json_out: bool, show_progress: bool) -> int:
    if output is not None and not output.is_dir():
        raise UsageError(output, "with a folder as input, -o must be an existing folder")
    from sdtk.ops.convert import convert_file, model_files_in

    files = model_files_in(folder)
    if not files:
        raise SdtkError(folder, "holds no model files (.safetensors .ckpt .pt .pth .bin)")
    results, failures = [], []
    with _progress_display(show_progress, batch_total=len(files)) as progress:
        for path in files:
            try:
                _, summary = convert_file(path, opts, out_folder=output, progress=progress)
                results.append(summary)
                if not json_out:
                    _print_summary(summary)
            except SdtkError as e:
                failures.append({"input": str(path), "error": str(e)})
                if not json_out:
                    error_line(str(e))
            progress.next_file()
    if json_out:
        print_json({"converted": results, "failed": failures})
    else:
        console.print(f"{len(results)} of {len(files)} files converted" + (f", {len(failures)} refused" if failures else ""))
    return EXIT_BAD_INPUT if failures else EXIT_OK


def _print_summary(summary: dict) -> None:
    for out in summary["outputs"]:
        console.print(f"wrote {esc(out['path'])} ({out['tensors']} tensors, {out['bytes']:,} bytes)")
        if out["sidecar"]:
            console.print(f"wrote {esc(out['sidecar'])} (A1111 config)")
    arch = summary["architecture"] or "unknown architecture"
    pred = f", {summary['prediction_type']}-prediction" if summary["prediction_type"] else ""
    console.print(f"  model: {esc(arch)}{esc(pred)}")
    for op in summary["operations"]:
        console.print(f"  done: {esc(op)}")
    for note in summary["notes"]:
        console.print(f"  {esc(note)}")
    if summary["source_hashes"] == "computed":
        console.print("  source hashes: computed for the lineage record (SHA256, AutoV3, content; kept in the hash "
                      "cache, so the next conversion of this file skips them; --no-source-hash skips them now)")
    elif summary["source_hashes"] == "cache":
        console.print("  source hashes: from the hash cache (this file was hashed before)")
    if summary["sidecar"] and summary["sidecar"] != "not needed":
        console.print(f"  config .yaml: {esc(summary['sidecar'])}")


class _ProgressDisplay:
    """Per-file byte progress (and a batch bar) on stderr; nothing when not a terminal.
    Has the callbacks of `sdtk.ops.convert.Progress`."""

    def __init__(self, enabled: bool, batch_total: Optional[int] = None):
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.enabled = enabled
        self.bars = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=err_console, transient=True, disable=not enabled)
        self.batch = self.bars.add_task("batch", total=batch_total) if (batch_total and enabled) else None
        self.task = None
        self.hash_task = None
        self.start, self.advance, self.done, self.hashing = self._start, self._advance, self._done, self._hashing

    def _hashing(self, source, done, total):
        # from the source-hash thread (rich's Progress is thread-safe): the first conversion of a
        # file also reads it for the lineage hashes, which can outlast the write
        if self.hash_task is None:
            self.hash_task = self.bars.add_task(f"hashing {Path(source).name} (lineage)", total=total)
        self.bars.update(self.hash_task, completed=done)
        if done >= total:
            self.bars.remove_task(self.hash_task)
            self.hash_task = None

    def _start(self, dest, total):
        self.task = self.bars.add_task(Path(dest).name, total=total)

    def _advance(self, done):
        if self.task is not None:
            self.bars.update(self.task, completed=done)

    def _done(self):
        if self.task is not None:
            self.bars.remove_task(self.task)
            self.task = None

    def next_file(self):
        if self.batch is not None:
            self.bars.advance(self.batch)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)


def _progress_display(enabled: bool, batch_total: Optional[int] = None) -> _ProgressDisplay:
    return _ProgressDisplay(enabled, batch_total)
