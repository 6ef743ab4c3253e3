"""Every file hash the ecosystem publishes, in one read of the file.

The calling thread reads the file into a small pool of large buffers (`HashOptions.chunk_bytes`,
default 16 MiB, `buffers` of them: peak memory is the pool, whatever the file's size). Each buffer
is handed to worker threads that run in parallel, because hashlib, blake3 and the CRC32 of zlib /
ISA-L release the GIL on large buffers:

    worker 1: SHA256 (whole file) + CRC32
    worker 2: AutoV3 (sha256 from the AutoV3 start offset) + BLAKE3
    worker 3: only with `tensor_spans`: one sha256 per tensor (content hash in the same read)

or, where the two-stream SHA-NI kernel pays (`sha2pair.worth_pairing()`: CPUs whose SHA round
instruction is latency-bound), worker 1 computes SHA256 and AutoV3 together (+ CRC32) and
worker 2 BLAKE3 alone.

AutoV1 needs only the 64 KiB at 1 MiB; the reader copies that window as it passes by.
A buffer goes back to the pool when every worker is done with it. Small files (under
`threads_from_bytes`) are hashed inline in the calling thread (no threads to start).

Definitions (source: shared reference `hashes.md`, Civitai's model scanner `HashTask.cs`,
A1111 `modules/hashes.py` + `modules/sd_models.py:model_hash`, kohya `library/train_util.py`):
- SHA256: sha256 of the whole file.  AutoV2: its first 10 hex digits.
- AutoV1: sha256 of the 0x10000 bytes at offset 0x100000 (as many as there are), 8 hex digits.
- AutoV3: u64 little-endian N from the first 8 bytes; if N < 16 MiB hash from 8+N, else from 8;
  sha256 of the rest of the file (any file type). Files shorter than 8 bytes hash nothing.
- CRC32: zlib's CRC-32 of the whole file.  BLAKE3: BLAKE3 of the whole file.
"""
from __future__ import annotations

import hashlib
import os
import queue
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import blake3

from sdtk.errors import FormatError, SdtkError
from sdtk.fileio import open_input
from sdtk.hashing import sha2pair

from sdtk.crc import IMPLEMENTATION as CRC32_IMPLEMENTATION  # isal when installed, else zlib
from sdtk.crc import crc32 as _crc32

AUTOV1_OFFSET = 0x100000  # 1 MiB (A1111 sd_models.model_hash: file.seek(0x100000))
AUTOV1_LENGTH = 0x10000  # 64 KiB (A1111: file.read(0x10000))
AUTOV3_HEADER_LIMIT = 16 * 1024 * 1024  # Civitai: a header length claim >= 16 MiB is not a header
MiB = 1024 * 1024

# (file offset, length, key) of each tensor's raw bytes, in offset order
TensorSpan = Tuple[int, int, str]
ProgressCallback = Callable[[int, int], None]


FILE_KINDS = ("sha256", "crc32", "autov3", "blake3")  # the whole-file hashes (AutoV1's window always rides along)
SPAN_KINDS = ("sha256", "blake3")  # per-tensor digests: sha256 for content v1, BLAKE3 for content v2


@dataclass(frozen=True)
class HashOptions:
    chunk_bytes: int = 16 * MiB
    buffers: int = 4  # peak buffer memory = chunk_bytes * buffers
    threads_from_bytes: int = 32 * MiB  # smaller files are hashed inline
    blake3_threads: int = 1  # blake3's own thread pool; on 2 cores it only competes with the sha256 worker
    kinds: Tuple[str, ...] = FILE_KINDS  # which whole-file hashes to compute (the others are None)
    span_kinds: Tuple[str, ...] = ("sha256",)  # which per-tensor digests, when tensor spans are given


@dataclass(frozen=True)
class FileHashes:
    """Raw results; `formatted(style)` gives what Civitai or A1111 print."""

    size: int
    sha256: Optional[str]  # 64 lower-case hex digits (None: not asked for, see HashOptions.kinds)
    autov1_window: str  # sha256 (64 hex) of the bytes at [1 MiB, 1 MiB + 64 KiB) that exist
    autov3: Optional[str]  # 64 hex: sha256 from `autov3_start` to the end
    autov3_start: int
    crc32: Optional[int]  # zlib.crc32 value (an unsigned int)
    blake3: Optional[str]  # 64 hex
    tensor_digests: Optional[Dict[str, str]] = field(default=None, compare=False)  # key -> sha256 hex
    tensor_digests_blake3: Optional[Dict[str, str]] = field(default=None, compare=False)  # key -> BLAKE3 hex

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    def formatted(self, style: str = "civitai") -> Dict[str, Optional[str]]:
        from sdtk.hashing.styles import format_hashes

        return format_hashes(self, style)


def autov3_start(head: bytes, size: int) -> int:
    """Where AutoV3 starts hashing, from the file's first 8 bytes (Civitai's 16 MiB rule)."""
    if len(head) < 8:
        return size  # not even a length: nothing to hash (sha256 of no bytes)
    (n,) = struct.unpack("<Q", head[:8])
    start = 8 + n if n < AUTOV3_HEADER_LIMIT else 8
    return min(start, size)


class _SpanHasher:
    """One digest per tensor span (sha256 or BLAKE3), fed with consecutive (offset, bytes) pieces."""

    def __init__(self, spans: Sequence[TensorSpan], algorithm: str = "sha256"):
        self.spans = sorted(spans)
        self.new = hashlib.sha256 if algorithm == "sha256" else blake3.blake3
        self.index = 0
        self.current = None
        self.digests: Dict[str, str] = {}
        for off, length, key in self.spans:  # empty tensors are complete before any byte
            if length == 0:
                self.digests[key] = self.new().hexdigest()

    def update(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        spans = self.spans
        while self.index < len(spans):
            s_off, s_len, key = spans[self.index]
            if s_len == 0:
                self.index += 1
                continue
            if s_off >= end:
                return
            lo, hi = max(s_off, offset), min(s_off + s_len, end)
            if hi > lo:
                if self.current is None:
                    self.current = self.new()
                self.current.update(view[lo - offset:hi - offset])
            if s_off + s_len <= end:
                self.digests[key] = (self.current or self.new()).hexdigest()
                self.current = None
                self.index += 1
            else:
                return

    def finish(self, path: str) -> Dict[str, str]:
        missing = [key for _, _, key in self.spans if key not in self.digests]
        if missing:
            raise FormatError(path, f"tensor {missing[0]!r} lies beyond the end of the file")
        return self.digests


class _Hashers:
    """The hash states and the units of work, each safe to run in its own thread. Only the kinds
    asked for are computed (a lineage pass needs SHA256, AutoV3 and the BLAKE3 span digests)."""

    def __init__(self, size: int, spans: Optional[Sequence[TensorSpan]], blake3_threads: int = 1,
                 kinds: Sequence[str] = FILE_KINDS, span_kinds: Sequence[str] = ("sha256",)):
        self.size = size
        self.kinds = frozenset(kinds)
        self.sha256 = hashlib.sha256() if "sha256" in self.kinds else None
        self.crc = 0 if "crc32" in self.kinds else None
        self.autov3 = hashlib.sha256() if "autov3" in self.kinds else None
        self.v3_start = size  # set from the first buffer
        self.blake3 = None
        if "blake3" in self.kinds:
            self.blake3 = blake3.blake3(max_threads=blake3_threads) if blake3_threads != 1 else blake3.blake3()
        self.pair = False  # SHA256 and AutoV3 in one interleaved pass (sdtk._sha2) where that pays
        if self.sha256 is not None and self.autov3 is not None and sha2pair.worth_pairing():
            self.sha256, self.autov3, self.pair = sha2pair.Sha256(), sha2pair.Sha256(), True
        self.window = bytearray()
        self.spans = _SpanHasher(spans, "sha256") if spans is not None and "sha256" in span_kinds else None
        self.spans_blake3 = _SpanHasher(spans, "blake3") if spans is not None and "blake3" in span_kinds else None
        self.worker_cpu: List[float] = []

    def first_bytes(self, head: bytes) -> None:
        self.v3_start = autov3_start(head, self.size)

    def take_window(self, offset: int, view: memoryview) -> None:
        lo, hi = max(offset, AUTOV1_OFFSET), min(offset + len(view), AUTOV1_OFFSET + AUTOV1_LENGTH)
        if hi > lo:
            self.window += view[lo - offset:hi - offset]

    def work_full(self, offset: int, view: memoryview) -> None:
        if self.sha256 is not None:
            self.sha256.update(view)
        if self.crc is not None:
            self.crc = _crc32(view, self.crc)

    def work_v3(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        if self.autov3 is not None and end > self.v3_start:
            self.autov3.update(view[max(0, self.v3_start - offset):])
        if self.blake3 is not None:
            self.blake3.update(view)

    def work_pair(self, offset: int, view: memoryview) -> None:
        """SHA256 and AutoV3 in one pass over the buffer (two messages interleaved), then CRC32."""
        end = offset + len(view)
        tail = view[max(0, self.v3_start - offset):] if end > self.v3_start else view[:0]
        sha2pair.update_pair(self.sha256, view, self.autov3, tail)
        if self.crc is not None:
            self.crc = _crc32(view, self.crc)

    def work_blake3(self, offset: int, view: memoryview) -> None:
        self.blake3.update(view)

    def work_spans(self, offset: int, view: memoryview) -> None:
        if self.spans is not None:
            self.spans.update(offset, view)
        if self.spans_blake3 is not None:
            self.spans_blake3.update(offset, view)

    def works(self) -> list:
        """The units of work with something to do, one thread each."""
        out = []
        if self.pair:
            out.append(self.work_pair)
            if self.blake3 is not None:
                out.append(self.work_blake3)
        elif self.sha256 is not None or self.crc is not None:
            out.append(self.work_full)
        if not self.pair and (self.autov3 is not None or self.blake3 is not None):
            out.append(self.work_v3)
        if self.spans is not None or self.spans_blake3 is not None:
            out.append(self.work_spans)
        return out

    def result(self, path: str) -> FileHashes:
        return FileHashes(
            size=self.size, sha256=self.sha256.hexdigest() if self.sha256 is not None else None,
            autov1_window=hashlib.sha256(bytes(self.window)).hexdigest(),
            autov3=self.autov3.hexdigest() if self.autov3 is not None else None, autov3_start=self.v3_start,
            crc32=self.crc & 0xFFFFFFFF if self.crc is not None else None,
            blake3=self.blake3.hexdigest() if self.blake3 is not None else None,
            tensor_digests=self.spans.finish(path) if self.spans is not None else None,
            tensor_digests_blake3=self.spans_blake3.finish(path) if self.spans_blake3 is not None else None,
        )


class _Slot:
    """A buffer of the pool; back to the pool when all `users` workers released it."""

    __slots__ = ("buffer", "view", "users", "lock", "pool")

    def __init__(self, size: int, pool: "queue.Queue[_Slot]"):
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.users = 0
        self.lock = threading.Lock()
        self.pool = pool

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            back = self.users == 0
        if back:
            self.pool.put(self)


def _worker(jobs: "queue.Queue", work, errors: List[BaseException], cpu: List[float]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            cpu.append(time.thread_time())  # this thread's CPU seconds (bench/bench_hash.py reports them)
            return
        slot, offset, n = job
        try:
            if not errors:
                work(offset, slot.view[:n])
        except BaseException as e:  # reported by the reader; keep draining so it never blocks
            errors.append(e)
        finally:
            slot.release()


def _read_full(f, view: memoryview, remaining: int) -> int:
    """Fill `view` (at most `remaining` bytes) from the file; fewer bytes only at its end."""
    view = view[:max(0, remaining)]
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class HashingCancelled(Exception):
    """`hash_file` stopped because its `cancelled()` turned true (nothing was remembered)."""


def hash_file(path: "os.PathLike[str] | str", *, tensor_spans: Optional[Sequence[TensorSpan]] = None,
              on_progress: Optional[ProgressCallback] = None, options: HashOptions = HashOptions(),
              stats: Optional[Dict[str, object]] = None,
              cancelled: Callable[[], bool] = lambda: False) -> FileHashes:
    """All six file hashes (and, with `tensor_spans`, one sha256 per tensor span) in one read.

    `stats`, when given, receives the CPU seconds of the reading thread and of each worker.
    Raises SdtkError when the file cannot be read or changes while it is read."""
    path = os.fspath(path)
    with open_input(path) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SdtkError(path, "not a regular file")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        raw = f.raw if hasattr(f, "raw") else f
        hashers = _Hashers(st.st_size, tensor_spans, options.blake3_threads, options.kinds, options.span_kinds)
        reader_cpu = time.thread_time()
        try:
            if st.st_size < options.threads_from_bytes:
                done = _hash_inline(raw, hashers, options, on_progress, cancelled)
            else:
                done = _hash_threaded(raw, hashers, options, on_progress, cancelled)
        except OSError as e:
            raise SdtkError(path, f"read failed: {e.strerror or e}") from None
        after = os.fstat(f.fileno())
        if stats is not None:
            stats["reader_cpu_s"] = time.thread_time() - reader_cpu
            stats["worker_cpu_s"] = list(hashers.worker_cpu)
    if done != st.st_size or after.st_size != st.st_size or after.st_mtime_ns != st.st_mtime_ns:
        raise SdtkError(path, "the file changed while it was being hashed (still downloading or being written?); hash it again when it is complete")
    return hashers.result(path)


def _hash_inline(raw, hashers: _Hashers, options: HashOptions, on_progress, cancelled) -> int:
    buf = bytearray(min(options.chunk_bytes, max(hashers.size, 8)))
    view = memoryview(buf)
    offset = 0
    while True:
        if cancelled():
            raise HashingCancelled()
        n = _read_full(raw, view, hashers.size - offset)
        if not n:
            break
        piece = view[:n]
        if offset == 0:
            hashers.first_bytes(bytes(piece[:8]))
        hashers.take_window(offset, piece)
        for work in hashers.works():
            work(offset, piece)
        offset += n
        if on_progress is not None:
            on_progress(offset, hashers.size)
    if offset == 0:
        hashers.first_bytes(b"")
    return offset


def _hash_threaded(raw, hashers: _Hashers, options: HashOptions, on_progress, cancelled) -> int:
    works = hashers.works() or [lambda offset, view: None]
    pool: "queue.Queue[_Slot]" = queue.Queue()
    for _ in range(max(2, options.buffers)):
        pool.put(_Slot(options.chunk_bytes, pool))
    errors: List[BaseException] = []
    queues = [queue.Queue() for _ in works]
    threads = [threading.Thread(target=_worker, args=(q, w, errors, hashers.worker_cpu), daemon=True, name=f"sdtk-hash-{i}")
               for i, (q, w) in enumerate(zip(queues, works))]
    for t in threads:
        t.start()
    offset = 0
    try:
        while not errors:
            if cancelled():
                errors.append(HashingCancelled())
                break
            slot = pool.get()
            n = _read_full(raw, slot.view, hashers.size - offset)
            if not n:
                pool.put(slot)
                break
            if offset == 0:
                hashers.first_bytes(bytes(slot.view[:8]))
            hashers.take_window(offset, slot.view[:n])
            slot.users = len(queues)
            for q in queues:
                q.put((slot, offset, n))
            offset += n
            if on_progress is not None:
                on_progress(offset, hashers.size)
    finally:
        for q in queues:
            q.put(None)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return offset


def hash_stream(raw, size: int, *, what: str = "<stream>", on_progress: Optional[ProgressCallback] = None,
                options: HashOptions = HashOptions()) -> FileHashes:
    """The same six hashes of `size` bytes read once from `raw` (anything with `readinto`: a remote
    object's body, `sdtk.formats.source`), with the same bounded buffer pool as `hash_file`.
    Raises SdtkError when the stream ends early."""
    hashers = _Hashers(size, None, options.blake3_threads)
    run = _hash_inline if size < options.threads_from_bytes else _hash_threaded
    try:
        done = run(raw, hashers, options, on_progress, lambda: False)
    except OSError as e:
        raise SdtkError(what, f"read failed: {e.strerror or e}") from None
    if done != size:
        raise SdtkError(what, f"the object ended after {done} of its {size} bytes (it changed while it was read?)")
    return hashers.result(what)


def hash_bytes(data: bytes) -> FileHashes:
    """The same hashes of an in-memory byte string (tests, small sidecars)."""
    hashers = _Hashers(len(data), None)
    view = memoryview(data)
    hashers.first_bytes(bytes(view[:8]))
    hashers.take_window(0, view)
    for work in hashers.works():
        work(0, view)
    return hashers.result("<bytes>")
