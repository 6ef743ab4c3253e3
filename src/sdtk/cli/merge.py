"""`sdtk merge` and `sdtk diff` (thin: options -> recipe -> ops.merge)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from sdtk.cli.common import console, err_console, esc, print_json
from sdtk.errors import SdtkError, UsageError


def _progress(enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True, disable=not enabled)


def _recipe_from_output(path: str):
    from sdtk.formats import open_model
    from sdtk.ops.merge.recipe import recipe_from_dict
    from sdtk.ops.merge.run import RECIPE_KEY

    with open_model(path) as cat:
        text = cat.metadata.get(RECIPE_KEY)
    if not text:
        raise SdtkError(path, f"has no {RECIPE_KEY} metadata (not made by sdtk merge)")
    try:
        data = json.loads(text)
    except ValueError:
        raise SdtkError(path, f"{RECIPE_KEY} metadata is not valid JSON") from None
    return recipe_from_dict(data, os.path.dirname(os.path.abspath(path)), path)


def _explain_blocks(model: Path, json_out: bool) -> int:
    from sdtk.formats import open_model
    from sdtk.ops.merge.arch import component_of, family_label, family_of
    from sdtk.ops.merge.blocks import BLOCK_LISTS, block_of

    with open_model(model) as cat:
        fam = family_of(cat)
        if fam not in BLOCK_LISTS:
            raise SdtkError(model, f"is {family_label(fam)}; block weights cover SD1, SD2, SDXL and FLUX")
        rows = {}
        for key, t in cat.tensors.items():
            block = block_of(key, fam)
            r = rows.setdefault(block, {"keys": 0, "parameters": 0, "components": set(), "example": key})
            r["keys"] += 1
            r["parameters"] += t.numel
            r["components"].add(component_of(key))
    names = BLOCK_LISTS[fam]
    if json_out:
        print_json({"file": str(model), "family": fam, "blocks": names,
                    "mapping": {n: {**rows[n], "components": sorted(rows[n]["components"])} for n in names if n in rows}})
        return 0
    from rich.table import Table

    table = Table(title=f"{esc(model.name)}: {family_label(fam)}, {len(names)} block weights (BASE first)")
    for col in ("#", "block", "keys", "parameters", "components", "example key"):
        table.add_column(col, justify="right" if col in ("#", "keys", "parameters") else "left")
    for i, n in enumerate(names):
        r = rows.get(n)
        if r:
            table.add_row(str(i), esc(n), str(r["keys"]), f"{r['parameters']:,}", esc(",".join(sorted(r["components"]))), esc(r["example"]))
        else:
            table.add_row(str(i), esc(n), "0", "0", "", "")
    console.print(table)
    return 0


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        models: List[Path] = typer.Argument(None, help="Models A B [C] (A is the primary: its keys, order and extras)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .safetensors file."),
        method: str = typer.Option("weighted-sum", "-m", "--method", help="weighted-sum, add-difference, triple-sum, sum-twice, train-difference, ties, dare, slerp, cosine."),
        alpha: Optional[float] = typer.Option(None, "-a", "--alpha", help="How much of B (method default if omitted)."),
        beta: Optional[float] = typer.Option(None, "-b", "--beta", help="Second scalar (triple-sum, sum-twice: share of C; ties: density; dare: drop rate)."),
        seed: int = typer.Option(0, "--seed", help="Seed for DARE (per key: seed + hash of the key name)."),
        blocks: Optional[str] = typer.Option(None, "--blocks", help="Block weights for alpha: a preset (GRAD_V, FLAT_25, ...) or 26 (SD1/SD2) / 20 (SDXL) / 58 (FLUX) comma-separated numbers; one fewer = no BASE."),
        te: str = typer.Option("merge", "--te", help="Text encoder: merge, A or B."),
        vae: str = typer.Option("merge", "--vae", help="VAE: merge, A or B."),
        bake_vae: Optional[Path] = typer.Option(None, "--bake-vae", help="Replace the VAE with this VAE file."),
        exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex: matching keys are copied from A, never merged."),
        out_dtype: Optional[str] = typer.Option(None, "--dtype", help="Output float dtype (fp16, bf16, fp32, ...; default: A's; a quantized A's weights: the dtype of its unquantized ones)."),
        to: Optional[str] = typer.Option(None, "--to", help="safetensors (default), gguf (with --quant; the diffusion model as city96's tools write it) or fp8-scaled (ComfyUI's per-layer form)."),
        quant: Optional[str] = typer.Option(None, "--quant", help="With --to gguf: Q8_0|Q6_K|Q5_K_M|Q5_K_S|Q4_K_M|Q4_K_S|Q5_0|Q5_1|Q4_0|Q4_1|Q3_K_M|Q3_K_S|Q2_K|F16|BF16."),
        recipe_file: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe (multi-step merges)."),
        recipe_from: Optional[Path] = typer.Option(None, "--recipe-from", help="Redo the merge stored in this sdtk-merged file (same bytes)."),
        model_overrides: List[str] = typer.Option([], "--model", help="NAME=PATH: where a recipe's model is (with --recipe-from)."),
        models_dirs: List[Path] = typer.Option([], "--models-dir", help="Folder to look for a recipe's models in (repeatable)."),
        no_hash: bool = typer.Option(False, "--no-hash", help="Skip the inputs' SHA256 (one full read each, done while writing); store size + header hash instead."),
        threads: int = typer.Option(0, "--threads", help="Threads computing each tensor's chunks (default: cores, at most 4)."),
        explain_blocks: bool = typer.Option(False, "--explain-blocks", help="Print the key -> block mapping of MODEL and exit."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> int:
        """Merge 2-3 models (or run a recipe) tensor by tensor: exact fp32 math, one cast, streaming."""
        from sdtk.ops.merge.recipe import load_recipe_file, single_step_recipe
        from sdtk.ops.merge.run import run_recipe

        models = list(models or [])
        if explain_blocks:
            if len(models) != 1:
                raise UsageError(None, "--explain-blocks takes exactly one model")
            return _explain_blocks(models[0], json_out)
        if output is None:
            raise UsageError(None, "give the output file with -o OUT.safetensors")
        for p in models:
            if not p.exists():
                raise SdtkError(p, "no such file")
        if recipe_file and recipe_from:
            raise UsageError(None, "--recipe and --recipe-from exclude each other")
        search = [str(d) for d in models_dirs]
        if recipe_file or recipe_from:
            if models:
                raise UsageError(None, "models come from the recipe; do not list them too")
            recipe = load_recipe_file(str(recipe_file)) if recipe_file else _recipe_from_output(str(recipe_from))
            if recipe_from:
                search = search + [os.path.dirname(os.path.abspath(recipe_from)), os.getcwd()]
            for item in model_overrides:
                name, sep, path = item.partition("=")
                if not sep or name not in recipe.models:
                    raise UsageError(None, f"--model {item!r}: expected NAME=PATH with NAME one of {', '.join(recipe.models)}")
                recipe.models[name] = path
            if out_dtype:
                recipe.dtype = out_dtype
            if bake_vae:
                recipe.bake_vae = str(bake_vae)
        else:
            if len(models) < 2:
                raise UsageError(None, f"merge needs 2 or 3 models (got {len(models)})")
            if len(models) > 3:
                raise UsageError(None, f"merge takes at most 3 models (got {len(models)}); use a --recipe for more")
            recipe = single_step_recipe([str(p) for p in models], method, alpha, beta, seed, blocks, te, vae, exclude,
                                        out_dtype, str(bake_vae) if bake_vae else None)
        progress = _progress(not json_out and err_console.is_terminal)
        state = {}

        def on_start(plan):
            state["task"] = progress.add_task(f"merging -> {output.name}", total=sum(t.nbytes for t in plan))

        def on_tensor(t, done):
            progress.update(state["task"], completed=done)

        with progress:
            result = run_recipe(recipe, str(output), overwrite=overwrite, hash_inputs=not no_hash,
                                search_dirs=search, on_start=on_start, on_tensor=on_tensor, workers=threads, to=to, quant=quant)
        summary = {"output": result.output, "bytes": result.bytes, "tensors": result.tensors,
                   "family": result.family, "models": result.models, "steps": result.steps,
                   "facts": result.facts, "sidecar": result.sidecar, "to": result.to, "quant": result.quant,
                   "ggml_types": result.ggml_types, "notes": result.notes}
        if json_out:
            print_json(summary)
            return 0
        console.print(f"wrote {esc(result.output)} ({result.tensors} tensors, {result.bytes:,} bytes)")
        if result.sidecar:
            console.print(f"wrote {esc(result.sidecar)} (A1111 config)")
        if result.ggml_types:
            console.print(f"  GGUF {result.quant}: " + ", ".join(f"{n} {k}" for k, n in result.ggml_types.items()))
        for note in result.notes:
            console.print(f"  note: {esc(note)}")
        for st in result.steps:
            copied = ", ".join(f"{v} {k}" for k, v in st["copied"].items()) or "none"
            console.print(f"  {esc(st['name'])}: {esc(st['method'])}: {st['merged']} merged, {len(st['sliced'])} channel-sliced; copied from A: {esc(copied)}")
            if st["only_in_primary"]:
                console.print(f"    kept from A (missing in another input): {len(st['only_in_primary'])}: {esc(', '.join(st['only_in_primary'][:5]))}{' ...' if len(st['only_in_primary']) > 5 else ''}")
            if st["not_in_primary"]:
                console.print(f"    dropped (not in A): {len(st['not_in_primary'])}: {esc(', '.join(st['not_in_primary'][:5]))}{' ...' if len(st['not_in_primary']) > 5 else ''}")
        return 0

    @app.command("diff")
    def diff_cmd(
        a: Path = typer.Argument(..., help="First model."),
        b: Path = typer.Argument(..., help="Second model (same architecture)."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> int:
        """Compare two models per block and per component: cosine similarity and relative L2 of A - B."""
        from sdtk.formats import open_model
        from sdtk.ops.merge.arch import family_label
        from sdtk.ops.merge.diff import diff_models

        with open_model(a) as ca, open_model(b) as cb:
            progress = _progress(not json_out and err_console.is_terminal)
            with progress:
                task = progress.add_task("comparing", total=ca.tensor_bytes)
                result = diff_models(ca, cb, on_tensor=lambda n: progress.advance(task, n))
        if json_out:
            print_json({"a": str(a), "b": str(b), **result.as_dict()})
            return 0
        t = result.total
        console.print(f"{esc(a.name)} vs {esc(b.name)}: {family_label(result.family)}; cosine {t['cosine']:.6f}, relative L2 {t['relative_l2']:.6f}")
        for title, rows in (("component", result.components), ("block", result.blocks)):
            if not rows:
                continue
            from rich.table import Table

            table = Table()
            for col in (title, "keys", "parameters", "identical", "cosine", "rel. L2"):
                table.add_column(col, justify="left" if col == title else "right")
            for name, r in rows.items():
                table.add_row(esc(name), str(r["keys"]), f"{r['parameters']:,}", str(r["identical_keys"]), f"{r['cosine']:.6f}", f"{r['relative_l2']:.6f}")
            console.print(table)
        for label, keys in (("only in A", result.only_in_a), ("only in B", result.only_in_b),
                            ("integer/bool tensors that differ", result.non_float_differs)):
            if keys:
                console.print(f"{label}: {len(keys)}: {esc(', '.join(keys[:5]))}{' ...' if len(keys) > 5 else ''}")
        return 0
