"""`sdtk hash FILE...`: SHA256, AutoV1, AutoV2, AutoV3, CRC32, BLAKE3 (and the content hash) in one read."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import List

import typer

from sdtk.cli.common import console, err_console, error_line, esc, print_json
from sdtk.errors import EXIT_BAD_INPUT, EXIT_OK, SdtkError, UsageError
from sdtk.hashing.styles import HASH_KEYS, STYLES

NO_VALUE = {"AutoV1": "-  (file under 2 MiB: Civitai computes no AutoV1)", "Content": "-  (not a model file)",
            "ContentV2": "-  (not a model file)"}
FOLDER_NOTE = "(a diffusers folder: no file hashes; the content hashes are those of its single file)"
PROGRESS_FROM_BYTES = 256 * 1024 * 1024  # a progress bar for files from this size, on a terminal


@contextmanager
def progress_for(path: Path, size: int, enabled: bool):
    """A rich progress bar (bytes, bytes/s, ETA) on stderr; yields the callback (or None)."""
    if not enabled or size < PROGRESS_FROM_BYTES or not err_console.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"hashing {path.name}", total=size)
        yield lambda done, total: bar.update(task, completed=done)


def hash_one(path: Path, style: str, content: bool, show_progress: bool, use_cache: bool = True) -> tuple:
    """({file, size, SHA256..BLAKE3 [, Content]}, content problem or None) for one file, in `style`.

    A file that is not a model still gets its six hashes; its Content is null and the problem
    (the reader's one-line message) is returned. Hashes come from the shared hash cache when this
    exact file (path, size, mtime, inode) was hashed before by any sdtk command."""
    from sdtk.formats.diffusers import is_diffusers_folder
    from sdtk.hashing.model import cached_model_hashes

    if is_diffusers_folder(path):
        return hash_folder(path, style), None
    size = os.stat(path).st_size if os.path.isfile(path) else 0
    problem, catalogue = None, None
    if content:
        from sdtk.formats import open_model

        try:
            catalogue = open_model(path)
        except SdtkError as e:
            if not os.path.isfile(path):
                raise
            problem = e
    try:
        with progress_for(path, size, show_progress) as on_progress:
            mh = cached_model_hashes(path, catalogue, content=catalogue is not None, on_progress=on_progress,
                                     use_cache=use_cache)
    finally:
        if catalogue is not None:
            catalogue.close()
    fh, content_value = mh.file, mh.content
    if style == "a1111":
        from sdtk.hashing.a1111 import a1111_autov3
        from sdtk.hashing.styles import format_hashes

        row = {"file": str(path), "size": fh.size, **format_hashes(fh, style, a1111_autov3(str(path), fh))}
    else:
        row = {"file": str(path), "size": fh.size, **fh.formatted(style)}
    if content:  # v1: what the library shows; v2 (BLAKE3-based): what convert/merge record as source_content_v2
        for key, value in (("Content", content_value), ("ContentV2", mh.content_v2)):
            row[key] = None if value is None else (value if style == "a1111" else value.upper())
    return row, problem


def hash_folder(path: Path, style: str) -> dict:
    """A diffusers folder has no single file to hash: its row holds only the content hashes of the
    tensors it stands for, under single-file names (the same catalogue `convert FOLDER` writes), so
    a folder sdtk wrote (with its sidecar) has the Content and ContentV2 of the file it came from.
    File hashes are null (`--content` is implied)."""
    from sdtk.formats import open_model
    from sdtk.formats.diffusers import folder_size
    from sdtk.hashing.folder import folder_content_hashes

    with open_model(path) as cat:
        v1, v2 = folder_content_hashes(cat)
    row = {"file": str(path), "size": folder_size(path), "folder": "diffusers", **{k: None for k in HASH_KEYS}}
    for key, value in (("Content", v1), ("ContentV2", v2)):
        row[key] = value if style == "a1111" else value.upper()
    return row


def print_row(row: dict) -> None:
    console.print(f"[bold]{esc(row['file'])}[/]  ({row['size']:,} bytes)")
    width = 9 if "ContentV2" in row else 7
    if row.get("folder"):
        console.print(f"  {FOLDER_NOTE}")
    for key in HASH_KEYS + ("Content", "ContentV2"):
        if key in row and not (row.get("folder") and key in HASH_KEYS):
            value = row[key]
            console.print(f"  {key:<{width}} {esc(value) if value is not None else NO_VALUE[key]}")


def register(app: typer.Typer) -> None:
    @app.command("hash")
    def hash_cmd(
        files: List[Path] = typer.Argument(..., help="Files to hash (any file; model files for --content)."),
        style: str = typer.Option("civitai", "--style", help="civitai: upper case, as Civitai shows them (AutoV3 12 digits, "
                                  "AutoV1 null under 2 MiB); a1111: lower case, as A1111 prints them (AutoV3 64 digits)."),
        content: bool = typer.Option(False, "--content", help="Also the content hash of the tensors (same weights in any "
                                     "container or after a metadata edit give the same value)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON list, one object per file."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        rehash: bool = typer.Option(False, "--rehash", help="Read the file even when the hash cache knows it "
                                    "(the cache is keyed on path, size, mtime and inode; SDTK_HASH_CACHE=off disables it)."),
    ) -> int:
        """All six hashes Civitai and A1111 use (SHA256, AutoV1, AutoV2, AutoV3, CRC32, BLAKE3) in one read."""
        if style not in STYLES:
            raise UsageError(None, f"--style must be one of {', '.join(STYLES)} (got {style!r})")
        rows, code = [], EXIT_OK
        for path in files:
            try:
                row, problem = hash_one(path, style, content, show_progress=not quiet and not json_out, use_cache=not rehash)
            except SdtkError as e:
                error_line(str(e))
                code = e.exit_code if code == EXIT_OK else code
                continue
            if problem is not None:
                error_line(f"{problem} (no content hash)")
                code = problem.exit_code if code == EXIT_OK else code
            rows.append(row)
            if not json_out:
                print_row(row)
        if json_out:
            print_json(rows)
        return code if rows or code else EXIT_BAD_INPUT
