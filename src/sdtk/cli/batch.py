"""`sdtk batch inspect|scan|hash SOURCE... --out RESULTS`: many objects, read in place, on a process
pool or Ray; resumable; one row per object."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from sdtk.cli.common import err_console, error_line, print_json
from sdtk.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, UsageError

HELP = {
    "inspect": "Identify every object (architecture, kind, precision...) from its header: safetensors header, "
               "zip directory + data.pkl of a .ckpt; never the tensor data.",
    "scan": "Safe/unsafe/unreadable verdict per object from its structure and pickle records only (nothing executed).",
    "hash": "SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 of every object, in one streaming read each.",
}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _progress_line(s) -> None:
    err_console.print(f"batch {s.command}: {s.processed}/{s.to_process} objects ({s.skipped} unchanged, skipped), "
                      f"{s.objects_per_s:.1f} objects/s, {_human_bytes(s.fetched_bytes_per_s)}/s fetched",
                      markup=False, highlight=False)


def _print_summary(s) -> None:
    out = sys.stdout
    out.write(f"batch {s.command}: {s.listed} objects listed, {s.skipped} unchanged (not read), {s.processed} read "
              f"in {s.seconds:.1f} s ({s.objects_per_s:.1f} objects/s)\n")
    out.write(f"  fetched {_human_bytes(s.fetched_bytes)} in {s.requests} requests"
              + (f" ({_human_bytes(s.fetched_bytes / s.processed)} per object)" if s.processed else "") + "\n")
    if s.verdicts:
        out.write("  verdicts: " + ", ".join(f"{n} {v}" for v, n in sorted(s.verdicts.items())) + "\n")
    if s.errors:
        out.write("  errors: " + ", ".join(f"{n} {k}" for k, n in sorted(s.errors.items())) + " (retried by the next run)\n")
    out.write(f"  results: {s.results} ({s.rows} rows)\n")
    out.flush()


def _engine(engine: str, workers: Optional[int], ray_address: Optional[str], task_cpus: Optional[float], command: str,
            ship: bool):
    from sdtk.batch import LocalEngine, RayEngine

    if engine == "local":
        if ray_address:
            raise UsageError(None, "--ray-address needs --engine ray")
        return LocalEngine(workers)
    if engine == "ray":
        return RayEngine(ray_address, task_cpus or (1.0 if command == "hash" else 0.5), ship_code=ship)
    raise UsageError(None, f"--engine must be local or ray (got {engine!r})")


def _command(command: str):
    def run(
        sources: List[str] = typer.Argument(..., help="Local folders, s3://bucket/prefix, or files listing URLs "
                                            "(http(s)://, s3://, paths), one per line."),
        out: Path = typer.Option(..., "--out", "-o", help="Results file: .jsonl, .parquet or .sqlite (one row per object). "
                                 "An existing one is continued: unchanged objects are not read again."),
        engine: str = typer.Option("local", "--engine", help="local (a process pool) or ray."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Local engine: processes (default: CPUs)."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (host:port or "
                                                  "ray://...); default: start a local one."),
        task_cpus: Optional[float] = typer.Option(None, "--task-cpus", help="Ray: CPUs per task (tasks per node = node "
                                                  "CPUs / this; default 0.5 for inspect/scan, 1 for hash)."),
        ship_code: bool = typer.Option(True, "--ship-code/--no-ship-code", help="Ray: send this sdtk to the cluster with "
                                       "the job (off when the cluster has it installed)."),
        s3_endpoint_url: Optional[str] = typer.Option(None, "--s3-endpoint-url", envvar="SDTK_S3_ENDPOINT_URL",
                                                      help="S3-compatible endpoint (MinIO, R2, Ceph...); credentials the "
                                                      "usual AWS way."),
        chunk: Optional[int] = typer.Option(None, "--chunk", help="Objects per task (default 16; 4 for hash)."),
        prune: bool = typer.Option(False, "--prune", help="Drop rows of objects no longer listed."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress lines on stderr "
                                                "(default: when stderr is a terminal)."),
    ) -> int:
        from sdtk.batch.run import run_batch

        eng = _engine(engine, workers, ray_address, task_cpus, command, ship_code)
        show = err_console.is_terminal if progress is None else progress
        summary = run_batch(command, sources, out, eng, endpoint_url=s3_endpoint_url, chunk_objects=chunk, prune=prune,
                            on_progress=_progress_line if show else None)
        if summary.interrupted:
            error_line(f"interrupted after {summary.processed} of {summary.to_process} objects; their rows are kept: "
                       "run the same command again to continue")
            return EXIT_INTERRUPTED
        if json_out:
            print_json(summary.to_json())
        else:
            _print_summary(summary)
        return summary.exit_code()

    run.__doc__ = HELP[command] + " Exit 0: all fine; 1: some objects unsafe, unreadable or failed; 2: the run could not start."
    return run


def register(app: typer.Typer) -> None:
    batch = typer.Typer(name="batch", no_args_is_help=True,
                        help="Inspect, scan or hash many objects in place (folders, S3, HTTP), on a process pool or Ray.")
    for command in ("inspect", "scan", "hash"):
        batch.command(command)(_command(command))
    app.add_typer(batch, name="batch")


def register_library_import(lib: typer.Typer, library, db_help: str, db_path) -> None:
    """`sdtk library import RESULTS`: called by cli/library.py with its helpers."""

    @lib.command("import")
    def import_cmd(
        results: List[Path] = typer.Argument(..., help="Results files of `sdtk batch inspect|scan|hash`."),
        db: Optional[Path] = typer.Option(None, "--db", help=db_help),
        json_out: bool = typer.Option(False, "--json", help="Print the import report as JSON."),
    ) -> int:
        """Bring `sdtk batch` results (hashes, identities, verdicts) into the library and the hash cache."""
        from sdtk.batch.importer import import_results

        reports = []
        with library(db) as conn:
            for path in results:
                if not path.exists():
                    raise UsageError(path, "no such results file")
                reports.append(import_results(conn, path))
        if json_out:
            print_json({"db": str(db_path(db)), "imports": [r.to_json() for r in reports]})
        else:
            for r in reports:
                sys.stdout.write(f"library {db_path(db)}: imported {r.imported} of {r.rows} rows of `batch {r.command}` from "
                                 f"{r.results} ({r.new} new, {r.updated} updated, {r.replaced} replaced; {r.skipped_errors} "
                                 f"rows with errors skipped; {r.hash_cache} local files into the hash cache)\n")
        return 0
