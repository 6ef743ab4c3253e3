"""`sdtk inspect FILE_OR_FOLDER...`: what a model file is, what is wrong with it, what to do.

Exit codes: 0 every file identified and no problems; 1 problems found (or a file not
identified); 2 a file was unreadable, hostile or missing (the worst case wins)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import typer

from sdtk.cli.common import console, err_console, print_json
from sdtk.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PROBLEMS, SdtkError, UsageError
from sdtk.identify import Identity, identify_path
from sdtk.report import LANGUAGES, json_report, text
from sdtk.report.fields import human_bytes

# Extensions of model files in a folder (A1111/ComfyUI model folders). Source: ComfyUI
# folder_paths.py supported_pt_extensions (.ckpt .pt .pt2 .bin .pth .safetensors .pkl .sft).
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl")


def iter_model_files(folder: str) -> Iterator[str]:
    """Model files under `folder`, sorted, recursively; a diffusers folder counts as one model."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if "model_index.json" in files and root != folder:
            dirs[:] = []
            yield root
            continue
        if "model_index.json" in files and root == folder:
            dirs[:] = []
            yield root
            continue
        for name in sorted(files):
            if name.lower().endswith(MODEL_EXTENSIONS) and not name.startswith("."):
                yield os.path.join(root, name)


def inspect_one(path: str, deep: bool, vae_ref: Optional[str], adapter_scan: bool = True) -> Tuple[Optional[Identity], Optional[Dict[str, Any]]]:
    """(identity, None) or (None, unreadable record); never raises for a bad file. `adapter_scan`:
    hash and NaN-scan adapter files (single files; a folder listing reads headers only)."""
    try:
        return identify_path(path, deep=deep, vae_ref=vae_ref, adapter_scan=adapter_scan), None
    except SdtkError as e:
        return None, {"path": path, "problem": e.problem, "error": type(e).__name__, "file_size": _size(path)}
    except (OSError, ValueError, KeyError, IndexError, TypeError, MemoryError, RecursionError) as e:  # hostile input the readers did not anticipate
        return None, {"path": path, "problem": f"could not be read ({type(e).__name__}: {e})", "error": "FormatError", "file_size": _size(path)}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path) if os.path.isfile(path) else 0
    except OSError:
        return 0


def exit_code_for(identities: List[Identity], unreadable: List[Dict[str, Any]]) -> int:
    if unreadable:
        return EXIT_BAD_INPUT
    if any(i.has_problems or not i.identified for i in identities):
        return EXIT_PROBLEMS
    return EXIT_OK


def base_fit(ident: Identity, base: str, lang: str) -> Tuple[Dict[str, Any], List[str]]:
    """How a LoRA fits `base` (inspect --base): a JSON record and the lines to print."""
    from sdtk.architectures.lora_keys import name_component
    from sdtk.ops.lora.bake import match_lora

    rep, title = match_lora(ident.path, base)
    comps = ", ".join(f"{k} {v}" for k, v in sorted(rep.components.items())) or "-"
    lines = [text("lora.base.title", lang, base=os.path.basename(base), title=title),
             "  " + text("lora.base.matched", lang, matched=rep.matched, modules=rep.modules, components=comps)]
    unet_missing = [m for m, _ in rep.unmatched if name_component(m) == "unet"]
    if rep.matched == 0:
        lines.append("  " + text("lora.base.none", lang))
    elif unet_missing and not rep.components.get("unet"):
        lines.append("  " + text("lora.base.te_only", lang, made_for=rep.base_guess or "?"))
    if rep.unmatched:
        examples = "; ".join(f"{m} ({why})" for m, why in rep.unmatched[:3]) + (" ..." if len(rep.unmatched) > 3 else "")
        lines.append("  " + text("lora.base.unmatched", lang, count=len(rep.unmatched), examples=examples))
    elif rep.matched:
        lines.append("  " + text("lora.base.all", lang))
    record = {"base": base, "base_architecture": title, **rep.as_dict()}
    return record, lines


def embedding_base_fit(ident: Identity, base: str, lang: str) -> Tuple[Dict[str, Any], List[str]]:
    """Whether an embedding fits `base` (inspect --base): its text encoders against the base's."""
    from sdtk.ops.embedding import fit_with_base
    from sdtk.report.fields import title_of

    base_ident = identify_path(base, hashes=False)
    encoders = {n: c.model for n, c in base_ident.components.items() if n.startswith("text_encoder")}
    widths = {k: v["width"] for k, v in (ident.adapter or {}).get("tensors", {}).items()}
    if "clip_l" not in widths:
        widths = {"emb_params": next(iter(widths.values()))} if widths else {}
    why = fit_with_base(widths, base_ident.family, encoders)
    title = title_of(base_ident.architecture)
    used = ", ".join(e["encoder"] for e in (ident.adapter or {}).get("encoders", []))
    line = (text("embedding.base.fits", lang, base=os.path.basename(base), title=title, encoders=used) if why is None else
            text("embedding.base.misfit", lang, base=os.path.basename(base), title=title, why=why))
    return {"base": base, "base_architecture": base_ident.architecture, "fits": why is None, "reason": why}, [line]


def run_inspect(paths: List[Path], json_out: bool, lang: str, deep: bool, vae_ref: Optional[Path], verbose: bool,
                base_model: Optional[Path] = None) -> int:
    if lang not in LANGUAGES:
        raise UsageError(None, f"--lang must be one of {', '.join(LANGUAGES)} (got {lang!r})")
    if vae_ref is not None and not os.path.isfile(vae_ref):
        raise UsageError(vae_ref, "--vae-ref: no such file")
    if not json_out:  # the human report needs rich; --json starts without it
        from sdtk.report.render import listing_line, render_identity
    if base_model is not None and not os.path.isfile(base_model):
        raise UsageError(base_model, "--base: no such file")
    identities: List[Identity] = []
    unreadable: List[Dict[str, Any]] = []
    fits: Dict[str, Dict[str, Any]] = {}
    listing = False
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p) and not os.path.exists(os.path.join(p, "model_index.json")):
            listing = True
            targets = list(iter_model_files(p))
            base = p
        else:
            targets = [p]
            base = os.path.dirname(p)
        for target in targets:
            ident, bad = inspect_one(target, deep, os.fspath(vae_ref) if vae_ref else None, adapter_scan=not listing or deep)
            if ident is not None:
                identities.append(ident)
                fit_lines: List[str] = []
                if base_model is not None and ident.kind == "lora":
                    fits[ident.path], fit_lines = base_fit(ident, os.fspath(base_model), lang)
                elif base_model is not None and ident.kind == "embedding":
                    fits[ident.path], fit_lines = embedding_base_fit(ident, os.fspath(base_model), lang)
                if not json_out and not listing:
                    console.print(render_identity(ident, lang, verbose=verbose))
                    for line in fit_lines:
                        console.print(line, markup=False, highlight=False)
                    console.print()
                elif not json_out:
                    console.print(listing_line(ident, lang, os.path.relpath(target, base) if base else target), markup=False, highlight=False)
            else:
                unreadable.append(bad)
                if not json_out:
                    shown = os.path.relpath(bad["path"], base) if listing and base else bad["path"]
                    line = f"  ✗  {shown}: {text('label.unreadable', lang)}: {bad['problem']}"
                    (console if listing else err_console).print(line, markup=False, highlight=False, style="red", soft_wrap=not listing)  # an error on stderr stays one line
    code = exit_code_for(identities, unreadable)
    if json_out:
        report = json_report(identities, unreadable, lang, code)
        for entry, ident in zip(report["files"], identities):
            if ident.path in fits:
                entry["base_fit"] = fits[ident.path]
        print_json(report)
    elif listing or len(identities) + len(unreadable) > 1:
        tot = json_report(identities, unreadable, lang, code)["totals"]
        console.print(text("totals.line", lang, **{**tot, "size_h": human_bytes(tot["bytes"])}), markup=False, highlight=False, soft_wrap=False)
    return code


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        paths: List[Path] = typer.Argument(..., help="Model files, or folders (every model file inside is listed)."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON (schema sdtk.inspect/1, see docs/inspect.md)."),
        lang: str = typer.Option("en", "--lang", help="Language of the report: en, ja, zh, ru."),
        deep: bool = typer.Option(False, "--deep", help="Also read every tensor: inf/NaN check, SD2 prediction heuristic."),
        vae_ref: Optional[Path] = typer.Option(None, "--vae-ref", help="A VAE file: is the VAE baked into the model the same?"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every finding and note."),
        base: Optional[Path] = typer.Option(None, "--base", help="A checkpoint: how many of a LoRA's modules apply to it, which do not and why; whether an embedding fits it."),
    ) -> int:
        """Say what a model file is, what is inside, what is wrong with it, and what to do.

        Exit codes: 0 all identified, no problems; 1 problems found; 2 a file was unreadable."""
        return run_inspect(paths, json_out, lang, deep, vae_ref, verbose, base)
