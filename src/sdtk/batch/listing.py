"""What a batch covers: SOURCE arguments -> `ObjectRef`s (url, size, ETag, mtime), without reading
any object.

- a local file: that file;
- a local folder: every regular file below it (sorted; hidden files and folders skipped); the
  "ETag" of a local file is `mtime_ns-size` (a change of either is a new version);
- `s3://bucket/prefix`: ListObjectsV2 (size and ETag come with the listing);
- a list file (a file named *.txt, *.list or *.urls): one URL per line (`http(s)://`, `s3://` or a local
  path; `#` comments); HTTP URLs are asked for their size and ETag with HEAD requests.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, List, Optional

from sdtk.errors import SdtkError, UsageError

LIST_SUFFIXES = (".txt", ".list", ".urls")  # a SOURCE file with one of these names lists URLs


@dataclass(frozen=True)
class ObjectRef:
    url: str
    size: int
    etag: Optional[str]
    mtime: Optional[str]  # ISO 8601 (S3 LastModified, HTTP Last-Modified, local mtime)

    @property
    def key(self):
        return (self.url, self.size, self.etag)


def is_url(text: str) -> bool:
    return text.startswith(("s3://", "http://", "https://"))


def list_sources(sources: List[str], endpoint_url: Optional[str] = None) -> Iterator[ObjectRef]:
    """Every object of every SOURCE, each once (first listing wins)."""
    seen = set()
    for src in sources:
        for ref in _list_one(src, endpoint_url):
            if ref.url not in seen:
                seen.add(ref.url)
                yield ref


def _list_one(src: str, endpoint_url: Optional[str]) -> Iterator[ObjectRef]:
    if src.startswith("s3://"):
        yield from list_s3(src, endpoint_url)
    elif src.startswith(("http://", "https://")):
        yield from _head_all([src])
    elif os.path.isdir(src):
        yield from list_folder(src)
    elif os.path.isfile(src) and src.lower().endswith(LIST_SUFFIXES):
        yield from list_file_of_urls(src, endpoint_url)
    elif os.path.isfile(src):
        yield local_ref(src)
    else:
        raise UsageError(src, "no such folder or list file (a SOURCE is a folder, s3://bucket/prefix or a file of URLs)")


def _iso(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def local_ref(path: str) -> ObjectRef:
    st = os.stat(path)
    return ObjectRef(os.path.abspath(path), st.st_size, f"{st.st_mtime_ns}-{st.st_size}", _iso(st.st_mtime))


def list_folder(root: str) -> Iterator[ObjectRef]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                if os.path.isfile(path) and not os.path.islink(path):
                    yield local_ref(path)
            except OSError:
                continue  # vanished while listing


def list_s3(url: str, endpoint_url: Optional[str]) -> Iterator[ObjectRef]:
    from sdtk.batch.sources import s3_client, s3_error, split_s3_url

    bucket, prefix = split_s3_url(url)
    if not bucket:
        raise UsageError(url, "an s3:// source needs a bucket: s3://bucket/prefix")
    client = s3_client(endpoint_url)
    token = None
    while True:
        args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            args["ContinuationToken"] = token
        try:
            page = client.list_objects_v2(**args)
        except Exception as e:
            err = s3_error(e, url, endpoint_url)
            raise SdtkError(url, f"cannot list: {err.problem}") from None
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):
                continue  # folder marker
            modified = obj.get("LastModified")
            yield ObjectRef(f"s3://{bucket}/{key}", int(obj["Size"]), str(obj.get("ETag", "")).strip('"') or None,
                            modified.isoformat() if modified is not None else None)
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def list_file_of_urls(path: str, endpoint_url: Optional[str]) -> Iterator[ObjectRef]:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except (OSError, UnicodeDecodeError) as e:
        raise SdtkError(path, f"cannot read the list of URLs: {e}") from None
    urls = [ln for ln in lines if ln and not ln.startswith("#")]
    http = [u for u in urls if u.startswith(("http://", "https://"))]
    heads = {r.url: r for r in _head_all(http)} if http else {}
    for u in urls:
        if u in heads:
            yield heads[u]
        elif u.startswith("s3://"):
            yield _head_s3(u, endpoint_url)
        elif os.path.isfile(u):
            yield local_ref(u)
        else:
            raise SdtkError(path, f"line {u[:80]!r} is not an http(s)://, s3:// URL or an existing file")


def _head_s3(url: str, endpoint_url: Optional[str]) -> ObjectRef:
    from sdtk.batch.sources import s3_client, s3_error, split_s3_url

    bucket, key = split_s3_url(url)
    try:
        obj = s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise SdtkError(url, s3_error(e, url, endpoint_url).problem) from None
    modified = obj.get("LastModified")
    return ObjectRef(url, int(obj["ContentLength"]), str(obj.get("ETag", "")).strip('"') or None,
                     modified.isoformat() if modified is not None else None)


def _head_all(urls: List[str]) -> Iterator[ObjectRef]:
    from sdtk.batch.sources import http_head

    from sdtk.formats.source import SourceError

    def one(u):
        try:
            size, etag, modified = http_head(u)
        except SourceError as e:
            if e.kind == "unreachable":
                raise
            return ObjectRef(u, -1, None, None)  # its row says why (vanished, refused...)
        return ObjectRef(u, size, etag, modified)

    with ThreadPoolExecutor(max_workers=16) as pool:
        try:
            yield from pool.map(one, urls)
        except SdtkError as e:
            raise SdtkError(e.path, f"cannot list: {e.problem}") from None
