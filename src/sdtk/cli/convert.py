"""`sdtk convert`: container change (the full convert is built on this)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdtk.cli.common import console, print_json
from sdtk.formats import open_model
from sdtk.formats.safetensors import write_safetensors
from sdtk.ops.container import carried_metadata, container_plan


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        source: Path = typer.Argument(..., help="Model file to convert (.ckpt/.pt/.bin/.safetensors)."),
        output: Optional[Path] = typer.Argument(None, help="Output .safetensors file (default: beside the input)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> int:
        """Convert a model file to safetensors, tensors bit-identical, metadata kept."""
        dest = output or source.with_suffix(".safetensors")
        with open_model(source) as cat:
            n = write_safetensors(dest, container_plan(cat), carried_metadata(cat), inputs=[source], overwrite=overwrite)
            summary = {"input": str(source), "output": str(dest), "tensors": len(cat), "bytes": n}
        if json_out:
            print_json(summary)
        else:
            console.print(f"wrote {dest} ({len(cat)} tensors, {n:,} bytes)")
        return 0
