"""Transports for `sdtk batch`: S3 objects (any S3-compatible store, through boto3) and HTTP(S) URLs,
read in place with range requests (`sdtk.formats.source.ByteSource`).

Every request names the ETag seen when the object was listed (`If-Match`), so an object replaced
while it is read fails with "changed" instead of mixing two versions; a missing object is
"vanished". Transport failures become `SourceError`s with a `kind` (unreachable, credentials,
denied, vanished, changed, unsupported, io) and a one-line message.

boto3 is imported only here and only when an s3:// source is used; clients are made once per
process and endpoint (workers of a process pool or Ray each make their own).
"""
from __future__ import annotations

import threading
import urllib.error
import urllib.request
from typing import Dict, Optional, Tuple

from sdtk.formats.source import ByteSource, CountingStream, SourceError

_clients: Dict[Optional[str], object] = {}
_clients_lock = threading.Lock()
HTTP_TIMEOUT = 30


def split_s3_url(url: str) -> Tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def s3_client(endpoint_url: Optional[str]):
    """One boto3 S3 client per process and endpoint; credentials and region the usual AWS way
    (environment, ~/.aws, instance role); region defaults to us-east-1 when none is configured."""
    with _clients_lock:
        client = _clients.get(endpoint_url)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise SourceError("s3://", "reading s3:// sources needs boto3 (pip install boto3)", "unsupported") from None
            session = boto3.session.Session()
            config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                            max_pool_connections=32, s3={"addressing_style": "path"} if endpoint_url else {})
            client = session.client("s3", endpoint_url=endpoint_url, config=config,
                                    region_name=session.region_name or "us-east-1")
            _clients[endpoint_url] = client
        return client


def s3_error(err: BaseException, url: str, endpoint_url: Optional[str] = None) -> SourceError:
    """A one-line SourceError for a boto3/botocore exception."""
    from botocore import exceptions as bx

    where = endpoint_url or "the AWS S3 endpoint"
    if isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        return SourceError(url, f"cannot reach {where} ({type(err).__name__}); check --s3-endpoint-url and the network", "unreachable")
    if isinstance(err, bx.NoCredentialsError):
        return SourceError(url, "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)", "credentials")
    if isinstance(err, bx.ReadTimeoutError):
        return SourceError(url, f"{where} did not answer in time (read timeout)", "unreachable")
    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
            return SourceError(url, f"S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE", "credentials")
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            return SourceError(url, f"access denied by S3 ({code or status}); the credentials may not read this bucket", "denied")
        if code == "NoSuchBucket":
            return SourceError(url, "no such bucket", "vanished")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return SourceError(url, "the object vanished (deleted since it was listed)", "vanished")
        if code in ("PreconditionFailed", "412") or status == 412:
            return SourceError(url, "the object changed since it was listed (ETag differs); run again to read the new version", "changed")
        if code == "InvalidRange" or status == 416:
            return SourceError(url, "the object is shorter than listed (it changed since it was listed)", "changed")
        return SourceError(url, f"S3 error {code or status}: {err.response.get('Error', {}).get('Message', '')}".strip(), "io")
    if isinstance(err, bx.BotoCoreError):
        return SourceError(url, f"S3 request failed: {err}", "io")
    return SourceError(url, f"S3 request failed: {type(err).__name__}: {err}", "io")


class S3Source(ByteSource):
    parallel_fetches = 8

    def __init__(self, url: str, size: int, etag: Optional[str], endpoint_url: Optional[str] = None):
        super().__init__(url, size, etag)
        self.bucket, self.key = split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.client = s3_client(endpoint_url)

    def _args(self) -> dict:
        args = {"Bucket": self.bucket, "Key": self.key}
        if self.etag:
            args["IfMatch"] = f'"{self.etag}"'
        return args

    def _fetch(self, offset: int, length: int) -> bytes:
        try:
            resp = self.client.get_object(Range=f"bytes={offset}-{offset + length - 1}", **self._args())
            total = _content_range_total(resp.get("ContentRange"))
            if total is not None and total != self.size:
                raise SourceError(self.url, f"the object is now {total} bytes, listed as {self.size} (it changed)", "changed")
            return resp["Body"].read()
        except SourceError:
            raise
        except Exception as e:
            raise s3_error(e, self.url, self.endpoint_url) from None

    def open_stream(self):
        try:
            resp = self.client.get_object(**self._args())
        except Exception as e:
            self.failure = s3_error(e, self.url, self.endpoint_url)
            raise self.failure from None
        if resp.get("ContentLength") not in (None, self.size):
            self.failure = SourceError(self.url, f"the object is now {resp.get('ContentLength')} bytes, listed as {self.size}", "changed")
            raise self.failure
        return CountingStream(self, resp["Body"])


def _content_range_total(value: Optional[str]) -> Optional[int]:
    # "bytes 0-99/1234" (RFC 9110 14.4)
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def http_error(err: BaseException, url: str) -> SourceError:
    if isinstance(err, urllib.error.HTTPError):
        if err.code == 404 or err.code == 410:
            return SourceError(url, f"the object vanished (HTTP {err.code})", "vanished")
        if err.code in (401, 403):
            return SourceError(url, f"access denied (HTTP {err.code})", "denied")
        if err.code in (412, 416):
            return SourceError(url, f"the object changed since it was listed (HTTP {err.code})", "changed")
        return SourceError(url, f"HTTP {err.code} {err.reason}", "io")
    if isinstance(err, urllib.error.URLError):
        return SourceError(url, f"cannot reach the server ({err.reason})", "unreachable")
    if isinstance(err, (TimeoutError, ConnectionError, OSError)):
        return SourceError(url, f"cannot reach the server ({type(err).__name__}: {err})", "unreachable")
    return SourceError(url, f"request failed: {type(err).__name__}: {err}", "io")


def http_head(url: str) -> Tuple[int, Optional[str], Optional[str]]:
    """(size, ETag, Last-Modified) of a URL; refuses servers without byte ranges."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            length = resp.headers.get("Content-Length")
            etag = resp.headers.get("ETag")
            modified = resp.headers.get("Last-Modified")
            ranges = (resp.headers.get("Accept-Ranges") or "").lower()
    except Exception as e:
        raise http_error(e, url) from None
    if length is None or not length.isdigit():
        raise SourceError(url, "the server gives no Content-Length", "unsupported")
    if ranges == "none":
        raise SourceError(url, "the server does not serve byte ranges (Accept-Ranges: none)", "unsupported")
    return int(length), _etag(etag), modified


def _etag(value: Optional[str]) -> Optional[str]:
    """A strong ETag without its quotes; a weak one (W/"...") kept as it is (never sent in If-Match)."""
    if not value:
        return None
    return value if value.startswith("W/") else value.strip('"')


class HttpSource(ByteSource):
    parallel_fetches = 8

    def _headers(self, rng: Optional[str]) -> dict:
        headers = {}
        if rng:
            headers["Range"] = rng
        if self.etag and not self.etag.startswith("W/"):  # If-Match needs a strong ETag (RFC 9110 13.1.1)
            headers["If-Match"] = f'"{self.etag}"'
        return headers

    def _fetch(self, offset: int, length: int) -> bytes:
        req = urllib.request.Request(self.url, headers=self._headers(f"bytes={offset}-{offset + length - 1}"))
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
                if resp.status != 206 and not (offset == 0 and length == self.size):
                    raise SourceError(self.url, "the server ignored the range request (no 206 answer)", "unsupported")
                total = _content_range_total(resp.headers.get("Content-Range"))
                if total is not None and total != self.size:
                    raise SourceError(self.url, f"the object is now {total} bytes, listed as {self.size} (it changed)", "changed")
                return resp.read(length)
        except SourceError:
            raise
        except Exception as e:
            raise http_error(e, self.url) from None

    def open_stream(self):
        req = urllib.request.Request(self.url, headers=self._headers(None))
        try:
            resp = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)
        except Exception as e:
            self.failure = http_error(e, self.url)
            raise self.failure from None
        return CountingStream(self, resp)
