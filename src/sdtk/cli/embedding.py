"""`sdtk embedding merge|convert` (thin: arguments -> sdtk.ops.embedding). Inspecting an
embedding is `sdtk inspect EMB [--base CKPT]`."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from sdtk.cli.common import console, print_json

embedding_app = typer.Typer(name="embedding", help="Textual-inversion embeddings: merge, convert .pt to safetensors.",
                            no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


def _report(result, verb: str) -> None:
    widths = " + ".join(f"{k} {w}" for k, w in result.widths.items())
    console.print(f"wrote {result.output} ({result.bytes:,} bytes): {verb}, {result.vectors} vectors per token ({widths})",
                  markup=False, highlight=False)
    if result.vectors > 75:
        console.print(f"  warning: {result.vectors} vectors are more than the 75 tokens of one prompt chunk", markup=False, highlight=False)


@embedding_app.command("merge")
def merge_cmd(
    embeddings: List[Path] = typer.Argument(..., help="Two or more embeddings made for the same text encoder(s)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    average: bool = typer.Option(False, "--average", help="Average the vectors (same count in every input) instead of concatenating them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> int:
    """Merge embeddings: vectors concatenated in the order given (one token for all), or averaged."""
    from sdtk.ops.embedding import merge_embeddings

    result = merge_embeddings([str(e) for e in embeddings], str(output), "average" if average else "concat", overwrite)
    if json_out:
        print_json(result.as_dict())
        return 0
    _report(result, f"{'averaged' if average else 'concatenated'} from {len(embeddings)} embeddings")
    return 0


@embedding_app.command("convert")
def convert_cmd(
    embedding: Path = typer.Argument(..., help="An embedding: A1111 .pt, diffusers .bin, or safetensors."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> int:
    """Write an embedding as safetensors (emb_params, or clip_l + clip_g): vectors bit for bit, name and step kept."""
    from sdtk.ops.embedding import convert_embedding

    result = convert_embedding(str(embedding), str(output), overwrite)
    if json_out:
        print_json(result.as_dict())
        return 0
    _report(result, f"from {result.inputs[0]['layout']} layout")
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(embedding_app, name="embedding")
