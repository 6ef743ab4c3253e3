"""The per-object work of `sdtk batch`: one ObjectRef -> one result row. Never raises.

- inspect: open the object in place (safetensors: 8 bytes + header; .ckpt: zip directory, local
  headers and data.pkl; legacy/plain pickles: the pickles) and identify it from names/shapes
  (plus the few tiny tensors identify reads); no tensor data otherwise.
- scan: `sdtk.scan.scan_file` on the object in place: structure and every pickle record, never
  the tensor storages.
- hash: the six file hashes in one streaming GET of the whole object, bounded memory.

Nothing in an object is ever executed (pickles only go through `sdtk.formats.picklevm`).
A transport problem (vanished, changed, refused) gives the row an `error` and no verdict; a bad
object (truncated, malformed, hostile, not a model) gives it a verdict and a reason.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from sdtk.version import __version__
from sdtk.batch.listing import ObjectRef
from sdtk.errors import SdtkError, UnsafeFileError
from sdtk.formats.source import ByteSource, LocalFileSource, SourceError

COMMANDS = ("inspect", "scan", "hash")
RESULTS_VERSION = 1  # bump when a column changes meaning; old results files are then refused

# (column, type) of every results row; types for Parquet/SQLite: str, int, float
COLUMNS = (
    ("url", "str"), ("size", "int"), ("etag", "str"), ("mtime", "str"), ("command", "str"),
    ("verdict", "str"), ("reason", "str"), ("format", "str"), ("kind", "str"), ("architecture", "str"),
    ("title", "str"), ("precision", "str"), ("tensor_count", "int"), ("parameters", "int"), ("dtypes", "str"),
    ("ema", "int"), ("base_model", "str"), ("info", "str"), ("globals", "str"),
    ("sha256", "str"), ("autov1", "str"), ("autov1_window", "str"), ("autov2", "str"), ("autov3", "str"),
    ("autov3_start", "int"), ("crc32", "str"), ("blake3", "str"),
    ("error", "str"), ("error_kind", "str"), ("fetched_bytes", "int"), ("requests", "int"), ("seconds", "float"),
    ("worker", "str"), ("sdtk_version", "str"),
)
COLUMN_NAMES = tuple(c for c, _ in COLUMNS)
HASH_CHUNK = 4 * 1024 * 1024
HASH_BUFFERS = 3  # 12 MiB of buffers per object being hashed


def open_source(ref: ObjectRef, settings: Dict[str, Any]) -> ByteSource:
    url = ref.url
    if url.startswith("s3://"):
        from sdtk.batch.sources import S3Source

        return S3Source(url, ref.size, ref.etag, settings.get("endpoint_url"))
    if url.startswith(("http://", "https://")):
        from sdtk.batch.sources import HttpSource, http_head

        size, etag = ref.size, ref.etag
        if size < 0:  # its HEAD failed when listed: ask again, for the reason
            size, etag, _ = http_head(url)
        return HttpSource(url, size, etag)
    try:
        source = LocalFileSource(url, size=ref.size)
    except FileNotFoundError:
        raise SourceError(url, "the file vanished (deleted since it was listed)", "vanished") from None
    except OSError as e:
        raise SourceError(url, f"cannot open: {e.strerror or e}", "io") from None
    if ref.etag and f"{source.mtime_ns}-{source.size}" != ref.etag and source.failure is None:
        source.failure = SourceError(url, "the file changed since it was listed (size or mtime); run again to read the new version", "changed")
    return source


def empty_row(ref: ObjectRef, command: str) -> Dict[str, Any]:
    row: Dict[str, Any] = dict.fromkeys(COLUMN_NAMES)
    row.update(url=ref.url, size=ref.size, etag=ref.etag, mtime=ref.mtime, command=command, sdtk_version=__version__)
    return row


def process_object(command: str, ref: ObjectRef, settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The result row of one object (see COLUMNS). Never raises."""
    settings = settings or {}
    row = empty_row(ref, command)
    start = time.perf_counter()
    source: Optional[ByteSource] = None
    try:
        source = open_source(ref, settings)
        if source.failure is not None:
            raise source.failure
        _WORK[command](source, row)
        if source.failure is not None:  # a reader turned a transport failure into a finding
            raise source.failure
        if isinstance(source, LocalFileSource):
            st = os.stat(ref.url)
            if ref.etag and f"{st.st_mtime_ns}-{st.st_size}" != ref.etag:
                raise SourceError(ref.url, "the file changed while it was read; run again to read the new version", "changed")
    except SourceError as e:
        _failed(row, e.problem, e.kind)
    except SdtkError as e:
        _failed(row, e.problem, "unreadable")
    except FileNotFoundError:
        _failed(row, "the file vanished while it was read", "vanished")
    except Exception as e:  # a bug of ours: the row says so, the run goes on
        _failed(row, f"internal error: {type(e).__name__}: {e}", "internal")
    finally:
        if source is not None:
            row["fetched_bytes"], row["requests"] = source.fetched_bytes, source.requests
            source.close()
        else:
            row["fetched_bytes"], row["requests"] = 0, 0
        row["seconds"] = round(time.perf_counter() - start, 6)
        row["worker"] = settings.get("worker") or f"pid:{os.getpid()}"
    return row


def _failed(row: Dict[str, Any], problem: str, kind: str) -> None:
    keep = {"url", "size", "etag", "mtime", "command", "sdtk_version"}
    for k in row:
        if k not in keep:
            row[k] = None
    row["error"], row["error_kind"] = problem, kind


def _inspect(source: ByteSource, row: Dict[str, Any]) -> None:
    from sdtk.formats import open_model
    from sdtk.library.describe import describe_for_library

    try:
        cat = open_model(source.url, source=source)
    except UnsafeFileError as e:
        row.update(verdict="unsafe", reason=e.problem)
        return
    except SourceError:
        raise
    except SdtkError as e:
        row.update(verdict="unreadable", reason=e.problem)
        return
    with cat:
        desc = describe_for_library(cat)
    info = desc.pop("info", None)
    words = desc.pop("trained_words", None)
    row.update({k: v for k, v in desc.items() if k in row})
    if words:
        info = dict(info or {}, trained_words=words)
    row["info"] = json.dumps(info, ensure_ascii=False, default=str, sort_keys=True) if info else None
    row["verdict"] = "safe"
    row["reason"] = "read by sdtk's strict reader (nothing executed)"


def _scan(source: ByteSource, row: Dict[str, Any]) -> None:
    from sdtk.scan import scan_file

    result = scan_file(source.url, source=source)
    row.update(verdict=result.verdict, reason=result.reason, format=result.format, tensor_count=result.tensors,
               globals=json.dumps(result.globals) if result.globals else None)
    if len(result.findings) > 1:
        row["info"] = json.dumps({"findings": [f.message for f in result.findings[:20]]}, ensure_ascii=False)


def _hash(source: ByteSource, row: Dict[str, Any]) -> None:
    from sdtk.hashing.filehash import HashOptions, hash_stream
    from sdtk.hashing.styles import crc32_civitai_hex

    stream = source.open_stream()
    try:
        fh = hash_stream(stream, source.size, what=source.url,
                         options=HashOptions(chunk_bytes=HASH_CHUNK, buffers=HASH_BUFFERS))
    finally:
        stream.close()
    row.update(sha256=fh.sha256, autov1=fh.autov1_window[:8], autov1_window=fh.autov1_window, autov2=fh.autov2,
               autov3=fh.autov3, autov3_start=fh.autov3_start, crc32=crc32_civitai_hex(fh.crc32), blake3=fh.blake3)


_WORK = {"inspect": _inspect, "scan": _scan, "hash": _hash}


def process_chunk(command: str, refs, settings: Optional[Dict[str, Any]] = None):
    """Rows of several objects (one task of an engine)."""
    return [process_object(command, ref, settings) for ref in refs]


def ray_process_chunk(command: str, refs, settings: Optional[Dict[str, Any]] = None):
    """`process_chunk` as a Ray task: rows name the Ray node that made them."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return process_chunk(command, refs, {**(settings or {}), "worker": f"ray-node:{node[:12]}/pid:{os.getpid()}"})
