"""`sdtk demo`: build realistic sample model files and show what sdtk says about them.

The samples have the exact key/shape/dtype layouts of real releases (see sdtk/data/layouts) and
zero-filled values, written as sparse files: full size on paper, almost no disk used."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from sdtk.cli.common import console

# (file name, layout, stored float dtype, container, note) — what users typically have on disk.
DEMO_FILES = (
    ("v1-5-pruned.ckpt", "sd15-full-ema", "float32", "ckpt", "an SD 1.5 training checkpoint as released (fp32 + EMA)"),
    ("noob-vpred-demo.safetensors", "sdxl-vpred-ztsnr", "float16", "safetensors", "an SDXL v-prediction model"),
    ("flux1-dev.safetensors", "flux1-dev", None, "safetensors", "the FLUX.1 [dev] transformer (bf16)"),
)


def write_demo_files(folder: Path) -> list[Path]:
    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.samples import layout_plan, load_layout, write_sparse_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, layout_name, float_dtype, container, _ in DEMO_FILES:
        layout = load_layout(layout_name)
        if float_dtype:
            layout = layout.with_dtype(float_dtype)
        path = folder / name
        if container == "ckpt":
            write_torch_zip(path, layout_plan(layout), wrap="state_dict", extras={"global_step": 840000, "epoch": 6},
                            sparse_zeros=True, overwrite=True)
        else:
            write_sparse_safetensors(path, layout)
        written.append(path)
    return written


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        folder: Path = typer.Option(Path("sdtk-demo"), "--dir", help="Where to write the sample files."),
        lang: str = typer.Option("en", "--lang", help="Language of the report: en, ja, zh, ru."),
    ) -> int:
        """Write sample model files (real layouts, zero-filled, sparse: no disk used), then scan and inspect them."""
        from sdtk.cli.inspect import run_inspect

        console.print(f"[bold]Writing sample model files to {escape(str(folder))}/[/] (sparse: full size on paper, ~no disk used)", soft_wrap=False)
        for (name, _, _, _, note) in DEMO_FILES:
            console.print(f"  {name}: {escape(note)}", soft_wrap=False)
        write_demo_files(folder)
        console.print()
        console.print(f"[bold]$ sdtk inspect {escape(str(folder / DEMO_FILES[0][0]))}[/]", soft_wrap=False)
        run_inspect([folder / DEMO_FILES[0][0]], json_out=False, lang=lang, deep=False, vae_ref=None, verbose=False)
        console.print()
        console.print(f"[bold]$ sdtk inspect {escape(str(folder))}[/]", soft_wrap=False)
        run_inspect([folder], json_out=False, lang=lang, deep=False, vae_ref=None, verbose=False)
        console.print()
        console.print("Next: [bold]sdtk convert " + escape(str(folder / DEMO_FILES[0][0])) + " --for generation[/] makes the 2.1 GB fp16 file for generating; "
                      "[bold]sdtk scan, hash, merge, library[/]: see README.md.", soft_wrap=False)
        return 0
