"""`sdtk scan PATH...`: a safe/unsafe/unreadable verdict per file, nothing ever executed."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import typer

from sdtk.cli.common import console, esc, print_json
from sdtk.errors import SdtkError
from sdtk.scan import SAFE, UNSAFE, exit_code, iter_model_files, scan_file
from sdtk.untrusted import line_field

_STYLE = {SAFE: "green", UNSAFE: "bold red", "unreadable": "yellow"}


def register(app: typer.Typer) -> None:
    @app.command("scan")
    def scan_cmd(
        paths: List[Path] = typer.Argument(..., help="Model files or folders (scanned recursively)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON list of verdicts."),
        lines: bool = typer.Option(False, "--lines", help="One plain line per file (VERDICT<TAB>PATH<TAB>REASON; \\ TAB newline and control characters in fields escaped as \\\\ \\t \\n \\xNN)."),
    ) -> int:
        """Check model files without executing them: exit 0 all safe, 1 any unsafe, 2 any unreadable."""
        for p in paths:
            if not p.exists():
                raise SdtkError(p, "no such file or folder")
        files = list(iter_model_files(paths))
        results = []
        for f in files:
            results.append(scan_file(f))
        if json_out:
            print_json({"files": [r.to_json() for r in results], "exit_code": exit_code(results)})
        elif lines or not console.is_terminal:
            for r in results:
                sys.stdout.write("\t".join(map(line_field, (r.verdict, r.path, r.reason))) + "\n")
            sys.stdout.flush()
        else:
            from rich.table import Table

            table = Table(show_header=True, header_style="bold")
            table.add_column("verdict")
            table.add_column("file", overflow="fold")
            table.add_column("format")
            table.add_column("reason", overflow="fold")
            for r in results:
                table.add_row(f"[{_STYLE[r.verdict]}]{r.verdict}[/]", esc(r.path), esc(r.format), esc(r.reason))
            console.print(table)
            counts = {v: sum(r.verdict == v for r in results) for v in (SAFE, UNSAFE, "unreadable")}
            console.print(f"{len(results)} file(s): {counts[SAFE]} safe, {counts[UNSAFE]} unsafe, {counts['unreadable']} unreadable")
        if not results:
            console.print("no model files found", markup=False)
        return exit_code(results)
