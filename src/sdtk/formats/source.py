"""Byte sources: a model file's bytes wherever they are (a local file, an S3 object, an HTTP URL),
read in place with range requests, so the readers of this package can open remote objects and
fetch only what they parse.

- `ByteSource`: `url`, `size`, `fetch(offset, length) -> bytes` (one range request), counters of
  requests and bytes fetched. Transports (`sdtk.batch.sources`) subclass it.
- `RangeBuffer`: what readers use instead of an mmap. `len()`, `buf[i]`, `buf[a:b]` (bytes),
  `find()` like mmap, and `madvise(MADV_WILLNEED, start, length)` like mmap: ranges a reader says
  it will need are fetched together at its next miss (coalesced, in parallel). Fetched bytes are
  kept in 4 KiB blocks (bounded LRU); a miss reads ahead `readahead` bytes.
- `SourceFile`: a sequential file-like over a RangeBuffer (`read(n)`), for readers that read a
  header with `f.read`.
- `buffer_window(buf, offset, length)`: a buffer-protocol object holding those bytes, for
  `np.frombuffer` (the mmap itself, or the fetched bytes of a RangeBuffer).

A fetch that fails (unreachable, refused, object changed or vanished) raises `SourceError` and is
remembered in `source.failure`, so a caller can tell a transport problem from a malformed file
even where a reader turned the exception into a finding.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence, Tuple

from sdtk.errors import SdtkError

BLOCK = 4096
READAHEAD = 64 * 1024  # a miss fetches at least this much (one request costs ~ the time of many KiB)
COALESCE_GAP = 64 * 1024  # wanted ranges closer than this are fetched in one request
CACHE_LIMIT = 128 * 1024 * 1024


class SourceError(SdtkError):
    """The bytes could not be fetched: `kind` is unreachable, credentials, denied, vanished,
    changed, unsupported or io. Not a problem of the file's content."""

    def __init__(self, url: str, problem: str, kind: str = "io"):
        super().__init__(url, problem)
        self.kind = kind


class ByteSource:
    """Subclasses implement `_fetch(offset, length) -> bytes` (exactly that many bytes)."""

    parallel_fetches = 1  # how many range requests `fetch_many` may run at once

    def __init__(self, url: str, size: int, etag: Optional[str] = None):
        self.url = url
        self.size = size
        self.etag = etag
        self.requests = 0
        self.fetched_bytes = 0
        self.failure: Optional[SourceError] = None
        self._lock = threading.Lock()
        self._buffer: Optional[RangeBuffer] = None

    def _fetch(self, offset: int, length: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def fetch(self, offset: int, length: int) -> bytes:
        if self.failure is not None:
            raise self.failure
        try:
            data = self._fetch(offset, length)
        except SourceError as e:
            self.failure = e
            raise
        if len(data) != length:
            self.failure = SourceError(self.url, f"asked for {length} bytes at offset {offset}, got {len(data)} "
                                                 "(the object changed while it was read?)", "changed")
            raise self.failure
        with self._lock:
            self.requests += 1
            self.fetched_bytes += length
        return data

    def fetch_many(self, ranges: Sequence[Tuple[int, int]]) -> List[bytes]:
        if len(ranges) <= 1 or self.parallel_fetches <= 1:
            return [self.fetch(o, n) for o, n in ranges]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.parallel_fetches, len(ranges))) as pool:
            return list(pool.map(lambda r: self.fetch(*r), ranges))

    def buffer(self) -> "RangeBuffer":
        if self._buffer is None:
            self._buffer = RangeBuffer(self)
        return self._buffer

    def open(self) -> "SourceFile":
        return SourceFile(self.buffer())

    def open_stream(self):
        """A raw stream of the whole object (`readinto`), one sequential read (hashing)."""
        return _BufferlessStream(self)

    def close(self) -> None:
        self._buffer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _BufferlessStream:
    """Fallback whole-object stream: consecutive large range requests (transports override)."""

    CHUNK = 8 * 1024 * 1024

    def __init__(self, source: ByteSource):
        self.source, self.pos = source, 0

    def readinto(self, view) -> int:
        n = min(len(view), self.source.size - self.pos, self.CHUNK)
        if n <= 0:
            return 0
        view[:n] = self.source.fetch(self.pos, n)
        self.pos += n
        return n

    def close(self) -> None:
        pass


class CountingStream:
    """`readinto` over a body (a file, an HTTP/S3 response), counting into the source's counters
    (one request); a failure mid-object becomes a SourceError remembered by the source."""

    def __init__(self, source: ByteSource, body, close: bool = True):
        self.source, self.body, self._close = source, body, close
        with source._lock:
            source.requests += 1

    def readinto(self, view) -> int:
        try:
            if hasattr(self.body, "readinto"):
                n = self.body.readinto(view) or 0
            else:
                data = self.body.read(len(view))
                n = len(data)
                view[:n] = data
        except Exception as e:
            err = SourceError(self.source.url, f"read failed mid-object: {type(e).__name__}: {e}", "io")
            self.source.failure = err
            raise err from None
        with self.source._lock:
            self.source.fetched_bytes += n
        return n

    def close(self) -> None:
        if self._close:
            try:
                self.body.close()
            except Exception:
                pass


class RangeBuffer:
    """An mmap look-alike over a ByteSource (see the module docstring)."""

    def __init__(self, source: ByteSource, *, readahead: int = READAHEAD, cache_limit: int = CACHE_LIMIT):
        self.source = source
        self.size = source.size
        self.readahead = readahead
        self.cache_limit_blocks = max(16, cache_limit // BLOCK)
        self.blocks: "OrderedDict[int, bytes]" = OrderedDict()
        self.pending: List[Tuple[int, int]] = []

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.read(0, self.size)

    # -- mmap-like interface ----------------------------------------------------------------
    def madvise(self, advice: int, start: int = 0, length: Optional[int] = None) -> None:
        import mmap

        if advice == getattr(mmap, "MADV_WILLNEED", None):
            length = self.size - start if length is None else length
            if length > 0:
                self.pending.append((start, length))

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            if step != 1:
                return self.read(min(start, stop), abs(stop - start))[::step]
            return self.read(start, max(0, stop - start))
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError("index out of range")
        block = self.blocks.get(index // BLOCK)
        if block is None:
            return self.read(index, 1)[0]
        return block[index % BLOCK]

    def find(self, sub: bytes, start: int = 0, end: Optional[int] = None) -> int:
        end = self.size if end is None else min(end, self.size)
        pos, step, overlap = start, 64 * 1024, max(0, len(sub) - 1)
        while pos < end:
            chunk = self.read(pos, min(step + overlap, end - pos))
            i = chunk.find(sub)
            if i >= 0:
                return pos + i
            if pos + len(chunk) >= end:
                return -1
            pos += step
            step = min(step * 2, 8 * 1024 * 1024)
        return -1

    def close(self) -> None:
        """Readers close what they mapped; the fetched blocks stay (the source owns them)."""

    # -- reading ----------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) (fewer at the end of the object)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if any(b not in self.blocks for b in range(first, last + 1)):
            self._fill(offset, length)
        out = bytearray()
        for b in range(first, last + 1):
            data = self.blocks[b]
            self.blocks.move_to_end(b)
            out += data
        base = first * BLOCK
        result = bytes(out[offset - base:offset - base + length])
        self._evict()
        return result

    def _fill(self, offset: int, length: int) -> None:
        wanted = [(offset, max(length, self.readahead))] + self.pending
        self.pending = []
        blocks = set()
        for start, n in wanted:
            start, stop = max(0, start), min(self.size, start + n)
            blocks.update(b for b in range(start // BLOCK, (stop - 1) // BLOCK + 1) if b not in self.blocks)
        runs = _runs(sorted(blocks), COALESCE_GAP // BLOCK)
        ranges = [(a * BLOCK, min(self.size, (b + 1) * BLOCK) - a * BLOCK) for a, b in runs]
        for (start, n), data in zip(ranges, self.source.fetch_many(ranges)):
            for i in range(0, n, BLOCK):
                self.blocks[(start + i) // BLOCK] = data[i:i + BLOCK]

    def _evict(self) -> None:
        while len(self.blocks) > self.cache_limit_blocks:
            self.blocks.popitem(last=False)


def _runs(blocks: Sequence[int], gap: int) -> List[Tuple[int, int]]:
    """(first, last) block runs, joining runs separated by at most `gap` missing blocks."""
    runs: List[Tuple[int, int]] = []
    for b in blocks:
        if runs and b - runs[-1][1] <= gap + 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    return runs


class SourceFile:
    """`with source.open() as f: f.read(8)`: a sequential, read-only file over a RangeBuffer."""

    def __init__(self, buf: RangeBuffer):
        self.buf, self.pos = buf, 0

    def read(self, n: int = -1) -> bytes:
        n = self.buf.size - self.pos if n is None or n < 0 else n
        data = self.buf.read(self.pos, n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.buf.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def buffer_window(buf, offset: int, length: int):
    """(buffer, offset in it) holding buf[offset:offset+length], for np.frombuffer: the mmap itself,
    or for a RangeBuffer the fetched bytes."""
    if isinstance(buf, RangeBuffer):
        return buf.read(offset, length), 0
    return buf, offset


def unpack_at(fmt, buf, offset: int) -> tuple:
    """struct.unpack_from for an mmap, bytes or a RangeBuffer (which has no buffer protocol)."""
    import struct

    st = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
    if isinstance(buf, RangeBuffer):
        return st.unpack(buf.read(offset, st.size))  # short at the end: struct.error, as unpack_from
    return st.unpack_from(buf, offset)


class LocalFileSource(ByteSource):
    """A local file through the same interface (os.pread), so every source is read the same way."""

    def __init__(self, path: str, size: Optional[int] = None, etag: Optional[str] = None):
        import os

        from sdtk.fileio import open_input

        self._file = open_input(path)
        st = os.fstat(self._file.fileno())
        super().__init__(path, st.st_size if size is None else size, etag)
        self.mtime_ns = st.st_mtime_ns
        if size is not None and st.st_size != size:
            self.failure = SourceError(path, f"the file changed (size {st.st_size}, listed as {size})", "changed")

    def _fetch(self, offset: int, length: int) -> bytes:
        import os

        try:
            return os.pread(self._file.fileno(), length, offset)
        except OSError as e:
            raise SourceError(self.url, f"read failed: {e.strerror or e}", "io") from None

    def open_stream(self):
        self._file.seek(0)
        return CountingStream(self, self._file.raw if hasattr(self._file, "raw") else self._file, close=False)

    def close(self) -> None:
        super().close()
        self._file.close()

