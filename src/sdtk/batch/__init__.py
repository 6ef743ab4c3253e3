"""`sdtk batch`: inspect, scan and hash many model files where they are (a folder, an S3 bucket,
HTTP URLs), reading them in place with range requests, on a process pool or a Ray cluster.

    from sdtk.batch import run_batch, LocalEngine
    summary = run_batch("scan", ["s3://models/uploads/"], Path("scan.parquet"), LocalEngine(4))

Modules: `listing` (SOURCE -> objects), `sources` (S3 and HTTP byte sources), `work` (one object
-> one row), `engine` (process pool, Ray), `results` (JSON lines / Parquet / SQLite, journal),
`run` (the driver), `importer` (results -> the library and the hash cache).
"""
from sdtk.batch.engine import LocalEngine, RayEngine
from sdtk.batch.run import BatchSummary, run_batch

__all__ = ["BatchSummary", "LocalEngine", "RayEngine", "run_batch"]
