"""The model library: an SQLite index of the user's model files (hashes, what they are, sidecars).

    from sdtk.library import open_library, scan_library
    conn = open_library()                      # per-user default, or open_library(path)
    report = scan_library(conn, ["~/ComfyUI/models"])

Modules: `db` (schema, migrations, WAL, damage), `folders` (A1111/ComfyUI layouts,
extra_model_paths.yaml), `sidecars`, `describe` (identify -> columns), `scan` (walker + cache),
`query` (list, show, find, dupes).
"""
from __future__ import annotations

import os
from typing import Optional

from sdtk.library.db import SCHEMA_VERSION, LibraryDamagedError, connect, default_db_path
from sdtk.library.query import Filters, find_dupes, find_hash, list_files, record_json, show_file
from sdtk.library.scan import ScanReport, scan_library


def open_library(db: "Optional[os.PathLike[str] | str]" = None, *, create: bool = True):
    """A connection to the library at `db` (default: `default_db_path()`), migrated to the current schema."""
    return connect(db if db is not None else default_db_path(), create=create)


__all__ = ["SCHEMA_VERSION", "Filters", "LibraryDamagedError", "ScanReport", "connect", "default_db_path",
           "find_dupes", "find_hash", "list_files", "open_library", "record_json", "scan_library", "show_file"]
