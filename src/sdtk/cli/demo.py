"""`sdtk demo`: build a realistic sample model file and show what sdtk says about it."""
from __future__ import annotations

from pathlib import Path

import typer

from sdtk.cli.common import console


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        folder: Path = typer.Option(Path("sdtk-demo"), "--dir", help="Where to write the sample files."),
    ) -> int:
        """Write sample model files (real SD layouts, zero-filled, sparse: no disk used) and inspect them."""
        from sdtk.samples import load_layout, write_sparse_safetensors
        from sdtk.formats import open_model

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "sd15-demo.safetensors"
        write_sparse_safetensors(path, load_layout("sd15-emaonly").with_dtype("float16"))
        with open_model(path) as cat:
            console.print(f"{path}: {cat.format}, {len(cat)} tensors, {cat.parameter_count:,} parameters")
        return 0
