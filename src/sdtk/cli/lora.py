"""`sdtk lora ...` (thin: arguments -> sdtk.ops.lora)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from sdtk.cli.common import console, err_console, print_json
from sdtk.errors import UsageError

lora_app = typer.Typer(name="lora", help="Bake, extract, merge, resize and convert LoRA / LyCORIS adapters (exact, streaming).",
                       no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True, disable=not enabled)


def _short(items, n=5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


@lora_app.command("apply")
def apply_cmd(
    base: Path = typer.Argument(..., help="Checkpoint or stand-alone UNet/DiT file to bake into."),
    loras: List[str] = typer.Argument(..., help="LORA[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS] (repeatable; applied in order). BLOCK_WEIGHTS: 17 or 26 numbers (SD 1.x/2.x), 12 or 20 (SDXL), or IN04=0.5,MID=0,... (LoRA Block Weight convention)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .safetensors file."),
    allow_unmatched: bool = typer.Option(False, "--allow-unmatched", help="Apply what matches; list what is skipped."),
    dora: str = typer.Option("comfyui", "--dora", help="DoRA strength convention: comfyui (= A1111) or lycoris."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Match and check only; write nothing."),
    out_dtype: Optional[str] = typer.Option(None, "--dtype", help="Quantized base (GGUF, fp8-scaled, NF4): write its dequantized weights as fp32|bf16|fp16 (default: the dtype of its unquantized weights, usually bf16)."),
    to: Optional[str] = typer.Option(None, "--to", help="safetensors (default), gguf (with --quant) or fp8-scaled: quantize the result again."),
    quant: Optional[str] = typer.Option(None, "--quant", help="With --to gguf: Q8_0|Q6_K|Q5_K_M|Q5_K_S|Q4_K_M|Q4_K_S|Q5_0|Q5_1|Q4_0|Q4_1|Q3_K_M|Q3_K_S|Q2_K|F16|BF16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> int:
    """Bake LoRAs into BASE: touched tensors computed in fp32 and cast once, the rest copied byte for byte."""
    from sdtk.adapters.matching import parse_lora_argument
    from sdtk.ops.lora.bake import bake

    if output is None and not dry_run:
        raise UsageError(None, "give the output file with -o OUT.safetensors (or --dry-run)")
    if output is not None and not str(output).endswith(".gguf" if to == "gguf" else ".safetensors"):
        raise UsageError(output, "the output must be a .gguf file" if to == "gguf" else "the output must be a .safetensors file")
    specs = [parse_lora_argument(a) for a in loras]
    progress = _progress(not json_out and err_console.is_terminal)
    state = {}

    def on_start(plan):
        state["task"] = progress.add_task(f"baking -> {output.name}", total=sum(t.nbytes for t in plan))

    def on_tensor(t, done):
        progress.update(state["task"], completed=done)

    with progress:
        result = bake(str(base), specs, str(output) if output else None, allow_unmatched=allow_unmatched,
                      overwrite=overwrite, dora_convention=dora, dry_run=dry_run, on_start=on_start, on_tensor=on_tensor,
                      dtype=out_dtype, to=to, quant=quant)
    if json_out:
        print_json(result.as_dict())
        return 0
    if result.output:
        console.print(f"wrote {result.output} ({result.tensors} tensors, {result.bytes:,} bytes): "
                      f"{result.computed} changed, {result.copied} copied unchanged")
    else:
        console.print(f"dry run on {os.path.basename(result.base)} ({result.base_title}): {result.computed} tensors would change")
    if result.dequantized:
        kinds = ", ".join(f"{n} {k}" for k, n in result.dequantized.items())
        made = (f"written {result.dequantized_dtype}" if result.to == "safetensors"
                else f"quantized again from {result.dequantized_dtype}")
        console.print(f"  quantized base: {sum(result.dequantized.values())} weights dequantized ({kinds}), {made}")
    if result.ggml_types:
        console.print("  GGUF " + str(result.quant) + ": " + ", ".join(f"{n} {k}" for k, n in result.ggml_types.items()))
    for rep in result.loras:
        kinds = ", ".join(f"{v} {k}" for k, v in rep.kinds.most_common())
        comps = ", ".join(f"{k} {v}" for k, v in sorted(rep.components.items()))
        made = f" [{rep.base_guess}]" if rep.base_guess else ""
        console.print(f"  {os.path.basename(rep.file)}{made} x{rep.strength:g} (te x{rep.te_strength:g}): "
                      f"{rep.matched} of {rep.modules} modules ({kinds}; {comps})")
        if rep.block_weights:
            console.print("    block weights: " + ", ".join(f"{b} x{v:g}" for b, v in rep.block_weights.items()) + " (other blocks x1)")
        if rep.unmatched:
            console.print(f"    skipped {len(rep.unmatched)}: " + _short(f"{m} ({why})" for m, why in rep.unmatched))
        if rep.ignored:
            console.print(f"    not model weights (bundled embeddings): {len(rep.ignored)}")
    if result.overflow:
        console.print(f"  warning: {sum(result.overflow.values())} values did not fit {len(result.overflow)} tensors' dtype "
                      f"(became inf / were clipped): {_short(result.overflow)}")
    return 0


@lora_app.command("merge")
def merge_cmd(
    loras: List[str] = typer.Argument(..., help="LORA[:WEIGHT] (two or more)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Re-factor each module to this rank (QR + small SVD of the stacked factors; the cap with --dynamic). Default: exact, ranks concatenated."),
    dynamic: Optional[str] = typer.Option(None, "--dynamic", help="With --rank: sv_ratio:R, sv_fro:F or sv_cumulative:C (kohya's conventions)."),
    out_dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype (default: the widest input's)."),
    kohya_ratios: bool = typer.Option(False, "--kohya-ratios", help="kohya merge_lora.py semantics (not exact): factors summed with sqrt(alpha_i/alpha_1)*W scales, so weights act as W|W| and cross terms appear; equal ranks only."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> int:
    """Merge LoRAs: exactly (ranks concatenated: applying the result equals applying each input at its weight), or to a rank with --rank (the truncated SVD of the exact sum; error reported)."""
    from sdtk.adapters.matching import parse_lora_argument
    from sdtk.ops.lora.merge import concat_merge, kohya_merge, rank_merge

    specs = [parse_lora_argument(a) for a in loras]
    if len(specs) < 2:
        raise UsageError(None, "lora merge takes two or more LoRAs")
    if any(s.te_strength is not None for s in specs):
        raise UsageError(None, "lora merge takes LORA[:WEIGHT] (one weight per LoRA)")
    if dynamic and rank is None:
        raise UsageError(None, "--dynamic needs --rank (the cap)")
    if rank is not None and rank < 1:
        raise UsageError(None, "--rank must be at least 1")
    pairs = [(s.path, s.strength) for s in specs]
    if kohya_ratios:
        if rank is not None:
            raise UsageError(None, "--kohya-ratios and --rank do not go together")
        result = kohya_merge(pairs, str(output), overwrite=overwrite, out_dtype=out_dtype)
        if json_out:
            print_json({"output": result.output, "modules": result.modules, "ranks": result.ranks, "exact": False,
                        "semantics": "kohya merge_lora.py", "inputs": [{"file": p, "weight": w} for p, w in result.inputs]})
        else:
            console.print(f"wrote {result.output}: {result.modules} modules, kohya merge_lora.py semantics "
                          f"(factors summed: weights act as W|W|, cross terms; not exact)")
        return 0
    if rank is None:
        result, rows = concat_merge(pairs, str(output), overwrite=overwrite, out_dtype=out_dtype), None
    else:
        method, param = _dynamic(dynamic) or (None, 0.0)
        result, rows = rank_merge(pairs, str(output), rank, method, param, overwrite=overwrite, out_dtype=out_dtype)
    if json_out:
        out = {"output": result.output, "modules": result.modules, "ranks": result.ranks,
               "inputs": [{"file": p, "weight": w} for p, w in result.inputs]}
        if rows is not None:
            out["exact"] = False
            out["per_module"] = [r.as_dict() for r in rows]
        print_json(out)
        return 0
    ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(result.ranks.items()))
    if rows is None:
        console.print(f"wrote {result.output}: {result.modules} modules ({ranks}), exact (ranks concatenated, alpha = rank)")
        return 0
    dense = sum(r.dense for r in rows)
    console.print(f"wrote {result.output}: {result.modules} modules ({ranks}), alpha = rank"
                  + (f"; {dense} made dense (Tucker / LoHa / LoKr / full diff inputs)" if dense else ""))
    changed = [r for r in rows if r.error > 0 or r.retained < 1]
    if rows:
        worst = max(rows, key=lambda r: r.error)
        errs = sorted(r.error for r in rows)
        console.print(f"  truncation error ||M - M_k|| / ||M||: median {errs[len(errs) // 2]:.4f}, worst {worst.error:.4f} ({worst.name}); "
                      f"{len(rows) - len(changed)} modules exact")
    return 0


@lora_app.command("resize")
def resize_cmd(
    lora: Path = typer.Argument(..., help="A LoRA / LoCon file."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    rank: int = typer.Option(..., "--rank", help="New rank (the cap when --dynamic is given)."),
    dynamic: Optional[str] = typer.Option(None, "--dynamic", help="sv_ratio:R, sv_fro:F or sv_cumulative:C (kohya's conventions)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> int:
    """Resize a LoRA through QR + a small SVD of its factors (the same singular values as a full SVD)."""
    from sdtk.ops.lora.resize import resize_file

    method, param = _dynamic(dynamic) or (None, 0.0)
    if rank < 1:
        raise UsageError(None, "--rank must be at least 1")
    rows = resize_file(str(lora), str(output), rank, method, param, overwrite)
    if json_out:
        print_json({"output": str(output), "modules": [{"module": n, "rank": o, "new_rank": k, "retained_fro": r} for n, o, k, r in rows]})
        return 0
    worst = min((r for *_, r in rows), default=1.0)
    console.print(f"wrote {output}: {len(rows)} modules, ranks {sorted({k for _, _, k, _ in rows})}; "
                  f"Frobenius norm retained: min {worst:.4f}")
    return 0


def _dynamic(text: Optional[str]):
    if not text:
        return None
    method, _, raw = text.partition(":")
    try:
        param = float(raw)
    except ValueError:
        raise UsageError(None, f"--dynamic {text!r}: expected METHOD:NUMBER") from None
    if method not in ("sv_ratio", "sv_fro", "sv_cumulative"):
        raise UsageError(None, "--dynamic must be sv_ratio:R, sv_fro:F or sv_cumulative:C")
    return method, param


@lora_app.command("extract")
def extract_cmd(
    tuned: Path = typer.Argument(..., help="The fine-tuned checkpoint (or UNet/DiT file)."),
    base: Path = typer.Argument(..., help="The model it was tuned from."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors LoRA."),
    rank: int = typer.Option(32, "--rank", help="Rank of Linear / 1x1 modules (the cap with --dynamic)."),
    conv_rank: Optional[int] = typer.Option(None, "--conv-rank", help="Also extract 3x3 ResNet/sampler convs (LoCon) at this rank."),
    dynamic: Optional[str] = typer.Option(None, "--dynamic", help="sv_ratio:R, sv_fro:F or sv_cumulative:C (kohya's conventions)."),
    components: Optional[str] = typer.Option(None, "--components", help="unet,te (or te1,te2...); default: the UNet/DiT and text encoders that differ."),
    svd: str = typer.Option("randomized", "--svd", help="randomized (fast) or exact (= a full SVD's top singular vectors)."),
    niter: int = typer.Option(2, "--niter", help="Subspace iterations of the randomized SVD."),
    clamp_quantile: float = typer.Option(1.0, "--clamp-quantile", help="Clamp the factors at this quantile of their entries (kohya: 0.99; 1: none)."),
    min_diff: float = typer.Option(0.01, "--min-diff", help="A text encoder is extracted when it differs by more than this."),
    out_dtype: str = typer.Option("fp16", "--dtype", help="Dtype of the factors: fp16, bf16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary (every module's error)."),
) -> int:
    """Extract TUNED - BASE as a kohya LoRA (LoCon with --conv-rank), streaming, with the error per module."""
    from sdtk.ops.lora.extract import ExtractOptions, extract

    comps = [c.strip() for c in components.split(",") if c.strip()] if components else None
    opts = ExtractOptions(rank=rank, conv_rank=conv_rank or None, dynamic=_dynamic(dynamic), components=comps, svd=svd,
                          niter=niter, clamp_quantile=clamp_quantile, min_diff=min_diff, dtype=out_dtype, overwrite=overwrite)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=err_console, transient=True,
                        disable=json_out or not err_console.is_terminal)
    state = {}

    def on_module(done, total, name):
        if "task" not in state:
            state["task"] = progress.add_task(f"extracting -> {output.name}", total=total)
        progress.update(state["task"], completed=done)

    with progress:
        result = extract(str(tuned), str(base), str(output), opts, on_module)
    if json_out:
        print_json(result.as_dict())
        return 0
    mods = result.modules
    ranks = sorted({m.rank for m in mods})
    console.print(f"wrote {result.output} ({result.bytes:,} bytes): {len(mods)} modules, rank "
                  f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, {result.architecture}, {result.seconds:.1f} s")
    for comp, (d, inc) in sorted(result.text_encoders.items()):
        console.print(f"  text encoder {comp}: max |difference| {d:.3g}: " + ("included" if inc else f"not included (<= --min-diff)"))
    changed = [m for m in mods if m.norm > 0]
    if changed:
        errs = sorted(m.error for m in changed)
        worst = max(changed, key=lambda m: m.error)
        console.print(f"  reconstruction error ||dW - up down|| / ||dW||: total {result.total_error:.4f}, "
                      f"median {errs[len(errs) // 2]:.4f}, worst {worst.error:.4f} ({worst.name})")
    if len(changed) < len(mods):
        console.print(f"  {len(mods) - len(changed)} modules are identical in both models (zero factors)")
    return 0


@lora_app.command("convert")
def convert_cmd(
    lora: Path = typer.Argument(..., help="A LoRA / LyCORIS file (any naming convention)."),
    to: str = typer.Option(..., "--to", help="kohya, diffusers (= PEFT-based loaders) or comfyui (alias comfy)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    base: Optional[Path] = typer.Option(None, "--base", help="The base model (names and shapes only); default: the shipped layout of the architecture the LoRA was made for."),
    allow_unmatched: bool = typer.Option(False, "--allow-unmatched", help="Leave out modules that match nothing in the base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> int:
    """Rename a LoRA into another convention (FLUX qkv / linear1 split or fused, alpha folded for diffusers): applying the result gives the same weights."""
    from sdtk.ops.lora.convert import convert_lora, normalise_target

    conv = normalise_target(to)
    if not str(output).endswith(".safetensors"):
        raise UsageError(output, "the output must be a .safetensors file")
    result = convert_lora(str(lora), str(output), conv, base=str(base) if base else None, overwrite=overwrite,
                          allow_unmatched=allow_unmatched)
    if json_out:
        print_json(result.as_dict())
        return 0
    console.print(f"wrote {result.output} ({result.bytes:,} bytes): {result.modules_in} modules -> {result.modules_out} "
                  f"{result.to} modules (base: {result.base})")
    console.print(f"  {result.renamed} renamed, {result.split} fused modules split, {result.fused} fused from parts, "
                  f"alpha/rank folded into the factors of {result.folded}")
    if result.skipped:
        console.print(f"  skipped {len(result.skipped)}: " + _short(f"{m} ({why})" for m, why in result.skipped))
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(lora_app, name="lora")
