"""`sdtk library scan|list|show|find|dupes|rebuild|info`: the SQLite index of the user's model files."""
from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from sdtk.cli.common import console, err_console, error_line, esc, print_json
from sdtk.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PROBLEMS, SdtkError
from sdtk.library import db as dbmod
from sdtk.library.query import (Filters, find_dupes, find_hash, list_files, parse_size, prediction_line, record_json,
                                show_file)

DB_HELP = "Library database file (default: SDTK_LIBRARY_DB, else the per-user data folder)."


def _db_path(db: Optional[Path]) -> Path:
    return Path(db).expanduser() if db is not None else dbmod.default_db_path()


@contextmanager
def library(db: Optional[Path], create: bool = True):
    """A migrated connection; any SQLite damage found on the way becomes the one-line rebuild message."""
    path = _db_path(db)
    conn = dbmod.connect(path, create=create)
    try:
        yield conn
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise SdtkError(path, f"the library database is busy ({e}); retry in a moment") from None
        raise dbmod.damaged(path, e) from None
    finally:
        conn.close()


def _human(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_scan(report, db: Path) -> None:
    r = report
    console.print(f"library {esc(db)}: {r.seen} model files in {len(r.roots)} folder(s) in {r.seconds:.2f} s")
    console.print(f"  new {r.new}, changed {r.changed}, unchanged {r.unchanged} (not read again), "
                  f"back {r.returned}, newly missing {r.missing}; hashed {r.hashed} files ({_human(r.hashed_bytes)})"
                  + (f", {r.hashes_from_cache} from the hash cache" if r.hashes_from_cache else ""))
    for root in r.offline:
        console.print(f"  [yellow]offline:[/] {esc(root)} (its records are kept, marked missing)")
    for root in r.absent:
        console.print(f"  [dim]not there:[/] {esc(root)}")
    for path, problem in r.problems:
        console.print(f"  [red]problem:[/] {esc(path)}: {esc(problem)}")


def _table(rows) -> None:
    from sdtk.report.fit import Column, FittedTable
    from sdtk.report.terminal_text import TerminalText

    recs = [record_json(row) for row in rows]
    # fits the terminal: the name is shortened in the middle, then columns are left out, least useful first
    columns = [Column("name", shrink_to=16), Column("kind", drop_order=2), Column("architecture", drop_order=5),
               Column("precision", drop_order=3), Column("EMA", drop_order=1), Column("size", justify="right"),
               Column("AutoV2", drop_order=4), Column("base model", drop_order=0), Column("status", drop_order=6)]
    table_rows = []
    for rec in recs:
        ema = "-" if rec["ema"] is None else ("yes" if rec["ema"] else "no")
        status = TerminalText(rec["status"], style="" if rec["status"] == "present" else "yellow")
        table_rows.append([rec["name"], rec["kind"] or "-", rec["architecture"] or "-", rec["precision"] or "-", ema,
                           _human(rec["size"]), (rec["hashes"] or {}).get("AutoV2") or "-", rec["base_model"] or "-", status])
    console.print(FittedTable(columns, table_rows))


def _print_record(rec: dict) -> None:
    console.print(f"[bold]{esc(rec['path'])}[/]  ({rec['size']:,} bytes, {esc(rec['status'])})")
    for key in ("format", "kind", "architecture", "precision", "ema", "base_model", "title", "tensor_count", "parameters", "problem"):
        if rec.get(key) not in (None, ""):
            console.print(f"  {key:<13} {esc(rec[key])}")
    prediction = prediction_line(rec.get("prediction"))
    if prediction:
        console.print(f"  {'prediction':<13} {esc(prediction)}")
    if rec["trained_words"]:
        console.print(f"  {'trained words':<13} {esc(', '.join(rec['trained_words']))}")
    for key, value in (rec["hashes"] or {}).items():
        console.print(f"  {esc(key):<13} {esc(value) if value is not None else '-'}")
    side = (rec["info"] or {}).get("sidecars") or {}
    for role, names in (side.get("files") or {}).items():
        console.print(f"  {esc('sidecar ' + role):<13} {esc(', '.join(names))}")
    civ = side.get("civitai")
    if civ:
        console.print(f"  {'civitai':<13} model {esc(civ.get('model_id'))} version {esc(civ.get('version_id'))} "
                      f"{esc(civ.get('model_name') or '')} ({esc(civ.get('type') or '?')})")
    for problem in side.get("problems") or []:
        console.print(f"  [yellow]sidecar problem:[/] {esc(problem)}")


def register(app: typer.Typer) -> None:
    lib = typer.Typer(help="The model library: an index (SQLite) of your model folders, hashes, and what each file is.",
                      no_args_is_help=True)
    app.add_typer(lib, name="library")

    @lib.command("scan")
    def scan_cmd(
        folders: Optional[List[Path]] = typer.Argument(None, help="Model folders (A1111/Forge or ComfyUI roots, models/ "
                                                       "folders, plain folders) or extra_model_paths.yaml files. "
                                                       "None: rescan the folders scanned before."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        no_content: bool = typer.Option(False, "--no-content", help="Skip the content hash (dupes then find only identical files)."),
        json_out: bool = typer.Option(False, "--json", help="Print the scan report as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> int:
        """Index model files: six hashes + content hash (cached by path, size, mtime, inode), identity, sidecars."""
        path = _db_path(db)
        with library(db) as conn:
            roots = [str(f) for f in folders] if folders else [r[0] for r in conn.execute("SELECT path FROM roots ORDER BY path")]
            if not roots:
                raise SdtkError(path, "no folders to scan: name one or more (`sdtk library scan ~/ComfyUI/models`)")
            show = not quiet and not json_out and err_console.is_terminal
            on_event = (lambda ev, p: err_console.print(f"[dim]{esc(ev)}[/] {esc(p)}")) if show else None
            report = _scan_with_progress(conn, roots, not no_content, on_event, show)
        if json_out:
            print_json({"db": str(path), **report.to_json()})
        else:
            _print_scan(report, path)
        return EXIT_PROBLEMS if report.problems else EXIT_OK

    @lib.command("list")
    def list_cmd(
        architecture: Optional[str] = typer.Option(None, "--arch", "--architecture", help="Architecture contains (sdxl, flux, stable-diffusion-v1 ...)."),
        kind: Optional[str] = typer.Option(None, "--kind", help="Kind contains (checkpoint, lora, vae, embedding ...)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="Precision contains (fp16, bf16, fp32, fp8)."),
        ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Only files with / without EMA weights."),
        min_size: Optional[str] = typer.Option(None, "--min-size", help="At least this size (500M, 2G)."),
        max_size: Optional[str] = typer.Option(None, "--max-size", help="At most this size."),
        name: Optional[str] = typer.Option(None, "--name", help="File path or title contains."),
        base_model: Optional[str] = typer.Option(None, "--base-model", help="Base model contains (SDXL, SD 1.5, Flux ...)."),
        trained_word: Optional[str] = typer.Option(None, "--trained-word", "--word", help="A trained word / trigger contains."),
        include_missing: bool = typer.Option(False, "--missing", help="Also files that are missing (vanished, offline drive)."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON list of records."),
    ) -> int:
        """List indexed model files, filtered."""
        filters = Filters(architecture=architecture, kind=kind, precision=precision, ema=ema,
                          min_size=parse_size(min_size) if min_size else None,
                          max_size=parse_size(max_size) if max_size else None, name=name, base_model=base_model,
                          trained_word=trained_word, include_missing=include_missing)
        with library(db, create=False) as conn:
            rows = list_files(conn, filters)
            if json_out:
                print_json([record_json(r) for r in rows])
            elif rows:
                _table(rows)
                console.print(f"{len(rows)} file(s)")
            else:
                console.print("no files match")
        return EXIT_OK

    @lib.command("show")
    def show_cmd(
        file: str = typer.Argument(..., help="A model file (path, or file name as indexed)."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> int:
        """Everything the library knows about one file."""
        with library(db, create=False) as conn:
            rows = show_file(conn, file)
            if not rows:
                raise SdtkError(file, "not in the library (run `sdtk library scan` on its folder)")
            recs = [record_json(r) for r in rows]
        if json_out:
            print_json(recs if len(recs) > 1 else recs[0])
        else:
            for rec in recs:
                _print_record(rec)
        return EXIT_OK

    @lib.command("find")
    def find_cmd(
        hash_text: str = typer.Argument(..., metavar="HASH", help="Any hash (SHA256, AutoV1/V2/V3, CRC32, BLAKE3, content), "
                                        "any case, or a prefix of 4+ digits."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> int:
        """Find files by hash. Exit 1 when none matches."""
        with library(db, create=False) as conn:
            hits = find_hash(conn, hash_text)
            out = [{"matched": h["matched"], **record_json(h["record"])} for h in hits]
        if json_out:
            print_json(out)
        else:
            for h in out:
                console.print(f"{esc(h['path'])}  [dim]({esc(', '.join(h['matched']))}; {esc(h['status'])})[/]")
            if not out:
                console.print(f"no file with a hash starting {esc(hash_text)}")
        return EXIT_OK if out else EXIT_PROBLEMS

    @lib.command("dupes")
    def dupes_cmd(
        include_missing: bool = typer.Option(False, "--missing", help="Count missing files too."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> int:
        """Identical files (same SHA256) and identical weights in different files (same content hash)."""
        with library(db, create=False) as conn:
            groups = find_dupes(conn, include_missing)
        if json_out:
            print_json({
                "identical_files": [{k: v for k, v in g.items() if k != "rows"} | {"paths": [r["path"] for r in g["rows"]]}
                                    for g in groups["identical_files"]],
                "identical_weights": [{"Content": g["Content"], "files": [
                    {"path": r["path"], "SHA256": r["sha256"].upper(), "format": r["format"], "size": r["size"]} for r in g["rows"]]}
                    for g in groups["identical_weights"]],
            })
            return EXIT_OK
        if not groups["identical_files"] and not groups["identical_weights"]:
            console.print("no duplicates")
        for g in groups["identical_files"]:
            note = " (some are hard links of one file)" if g["hard_links"] else ""
            console.print(f"[bold]identical files[/] SHA256 {g['SHA256'][:10]}..., {_human(g['size'])} each, "
                          f"{_human(g['reclaimable'])} reclaimable{note}")
            for r in g["rows"]:
                console.print(f"  {esc(r['path'])}")
        for g in groups["identical_weights"]:
            console.print(f"[bold]identical weights[/] (content {g['Content'][:12]}...), different files:")
            for r in g["rows"]:
                console.print(f"  {esc(r['path'])}  [dim]({esc(r['format'])}, SHA256 {r['sha256'][:10].upper()})[/]")
        return EXIT_OK

    @lib.command("rebuild")
    def rebuild_cmd(
        folders: Optional[List[Path]] = typer.Argument(None, help="Folders to scan into the new library (default: the "
                                                       "folders the old one had scanned, when they can be read)."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        no_content: bool = typer.Option(False, "--no-content", help="Skip the content hash."),
        json_out: bool = typer.Option(False, "--json", help="Print the scan report as JSON."),
    ) -> int:
        """Set the library database aside (kept, renamed *.damaged-TIME) and build a new one by scanning."""
        path = _db_path(db)
        kept = dbmod.set_aside(path)
        roots = [str(f) for f in folders] if folders else (dbmod.recover_roots(kept) if kept else [])
        if kept:
            err_console.print(f"old library kept as {esc(kept)}")
        with library(db) as conn:
            if not roots:
                console.print(f"new empty library {esc(path)}; scan your folders: sdtk library scan DIR...")
                return EXIT_OK
            report = _scan_with_progress(conn, roots, not no_content, None, False)
        if json_out:
            print_json({"db": str(path), "kept": str(kept) if kept else None, **report.to_json()})
        else:
            _print_scan(report, path)
        return EXIT_PROBLEMS if report.problems else EXIT_OK

    @lib.command("info")
    def info_cmd(
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> int:
        """Where the library is, its schema version, folders and counts; checks the database's integrity."""
        path = _db_path(db)
        with library(db, create=False) as conn:
            dbmod.check_integrity(conn, path)
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
            roots = [dict(r) for r in conn.execute("SELECT path, folder_kind, last_scanned, online FROM roots ORDER BY path")]
            data = {"db": str(path), "schema_version": dbmod.schema_version(conn), "files": counts, "roots": roots,
                    "integrity": "ok"}
        if json_out:
            print_json(data)
        else:
            console.print(f"library {esc(path)} (schema {data['schema_version']}, integrity ok)")
            console.print(f"  files: {counts.get('present', 0)} present, {counts.get('missing', 0)} missing")
            for r in roots:
                console.print(f"  folder {esc(r['path'])}{'' if r['online'] else '  [yellow](offline at last scan)[/]'}")
        return EXIT_OK

    from sdtk.cli.batch import register_library_import  # `library import RESULTS` (sdtk batch results)

    register_library_import(lib, library, DB_HELP, _db_path)


def _scan_with_progress(conn, roots, content: bool, on_event, show: bool):
    from sdtk.library.scan import scan_library

    if not show:
        return scan_library(conn, roots, content=content, on_event=on_event)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        tasks = {}

        def on_progress(path, done, total):
            if total < 256 * 1024 * 1024:
                return
            if path not in tasks:
                tasks[path] = bar.add_task(f"hashing {os.path.basename(path)}", total=total)
            bar.update(tasks[path], completed=done)
            if done >= total:
                bar.remove_task(tasks.pop(path))

        return scan_library(conn, roots, content=content, on_event=on_event, on_progress=on_progress)
