"""A large output written past the page cache (Linux O_DIRECT), through aligned staging buffers.

Why (measured on the 2-core test machine, bench/bench_merge_sd15.py and BENCHMARKS.md): writing
2 GiB through the page cache with plain write() cost 4.4-4.9 s of CPU (the kernel copying into
freshly allocated page-cache folios, ext4 delayed allocation, then writeback) and 12-16 s of wall
time; the same bytes written with O_DIRECT from 8 MiB buffers cost 0.12 s of CPU and 1.4-1.8 s.
A merge spent 45 % of its CPU in the kernel's copy into the page cache.

How: `DirectWriter` is a small file-like object (write, flush, tell, seek, fileno, close) over the
temporary file of an `AtomicOutput`. Bytes are copied into page-aligned staging buffers (anonymous
mmaps); a full buffer is written at its aligned file offset by one writer thread (os.pwrite
releases the GIL: the next tensor is computed meanwhile), so at most `buffers` buffers are in use.
- `flush()` waits for the writer, then writes the partial last buffer rounded up to the alignment
  and truncates the file to its real length, so everything written so far is in the file (the
  bytes stay in the buffer; the next full write of that buffer rewrites the block).
- A write before the end (the safetensors header rewritten at the end, same length) is
  read-modify-write of the aligned blocks it covers.
- `copy_from(fd, offset, length)`: raw bytes of an input read straight into the staging buffers.
When the file system refuses O_DIRECT (fcntl or the first write fails with EINVAL: tmpfs on old
kernels, some network file systems), the same code carries on without it, with large buffers.
`SDTK_DIRECT_IO=off` turns it off (benchmarks compare the two).
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import List, Optional

ALIGN = 4096  # a multiple of every device's logical block size (512 or 4096) and of the page size
BUFFER_BYTES = 8 << 20
BUFFERS = 3
MIN_BYTES = 64 << 20  # smaller outputs go through the page cache as before (no gain, more syscalls)


def enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("SDTK_DIRECT_IO", "").lower() not in ("0", "off", "no", "false")


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DirectWriter:
    """File-like writer of `fd` (an empty file opened for reading and writing: a rewrite before the
    end reads back the blocks it covers); see the module docstring."""

    def __init__(self, fd: int, buffer_bytes: Optional[int] = None, buffers: Optional[int] = None):
        buffer_bytes, buffers = buffer_bytes or BUFFER_BYTES, buffers or BUFFERS
        assert buffer_bytes % ALIGN == 0 and buffers >= 2
        self._fd = fd
        self.closed = False
        self.direct = self._set_direct(True)
        self._size = buffer_bytes
        self._free: List[mmap.mmap] = [mmap.mmap(-1, buffer_bytes) for _ in range(buffers)]
        self._buf = self._free.pop()
        self._base = 0  # file offset of self._buf's first byte (aligned)
        self._fill = 0  # bytes of self._buf in use
        self._cursor: Optional[int] = None  # set by seek() to a position before the end
        self._truncated_to = 0
        self._cond = threading.Condition()
        self._jobs: List[tuple] = []
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="sdtk-direct-write")
        self._thread.start()

    # -- the file protocol ----------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._end() if self._cursor is None else self._cursor

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < 0 or pos > self._end():
            raise ValueError("DirectWriter seeks only to absolute positions within what was written")
        self._cursor = None if pos == self._end() else pos
        return pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._cursor is not None:
            return self._patch(view)
        done = 0
        while done < len(view):
            k = min(len(view) - done, self._size - self._fill)
            self._buf[self._fill:self._fill + k] = view[done:done + k]
            self._fill += k
            done += k
            if self._fill == self._size:
                self._submit()
        return done

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """`length` bytes of file `fd` from `offset`, appended (read into the staging buffers)."""
        assert self._cursor is None
        while length > 0:
            k = min(length, self._size - self._fill)
            n = os.preadv(fd, [memoryview(self._buf)[self._fill:self._fill + k]], offset)
            if n <= 0:
                raise OSError(errno.EIO, "unexpected end of an input while copying")
            self._fill += n
            offset += n
            length -= n
            if self._fill == self._size:
                self._submit()

    def flush(self) -> None:
        self._wait()
        if self._fill:
            self._pwrite(memoryview(self._buf)[:_round_up(self._fill)], self._base)
        end = self._end()
        if end != self._truncated_to or self._fill:
            os.ftruncate(self._fd, end)
            self._truncated_to = end

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self._shutdown()
            self.closed = True
            os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- inside ---------------------------------------------------------------------------
    def _end(self) -> int:
        return self._base + self._fill

    def _set_direct(self, on: bool) -> bool:
        try:
            import fcntl

            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
            return on
        except (OSError, ImportError, AttributeError):
            return False

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct:  # the file system refuses O_DIRECT
                    self.direct = self._set_direct(False)
                    continue
                raise
            if n <= 0:
                raise OSError(errno.EIO, "write returned no progress")
            view, offset = view[n:], offset + n

    def _submit(self) -> None:
        """Hand the full buffer to the writer thread; continue in a free one."""
        with self._cond:
            if self._error is not None:
                raise self._error
            self._jobs.append((self._buf, self._base))
            self._cond.notify_all()
            while not self._free and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._buf = self._free.pop()
        self._base += self._size
        self._fill = 0

    def _wait(self) -> None:
        with self._cond:
            while self._jobs and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs:
                    return
                buf, base = self._jobs[0]
            try:
                if self._error is None:
                    self._pwrite(memoryview(buf), base)
            except BaseException as e:  # raised in the writing thread at its next call
                self._error = e
            with self._cond:
                self._jobs.pop(0)
                self._free.append(buf)
                self._cond.notify_all()

    def _shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _patch(self, view: memoryview) -> int:
        """Overwrite [cursor, cursor + len) of what was written (read-modify-write, aligned)."""
        start = self._cursor
        assert start is not None
        end = start + len(view)
        if end > self._end():
            raise ValueError("DirectWriter overwrites only bytes already written")
        self.flush()
        lo, hi = start - start % ALIGN, _round_up(end)
        scratch = mmap.mmap(-1, hi - lo)
        try:
            got = os.preadv(self._fd, [scratch], lo)
            if got < min(hi, self._end()) - lo:
                raise OSError(errno.EIO, "could not read back the output")
            scratch[start - lo:end - lo] = view
            self._pwrite(memoryview(scratch)[:hi - lo], lo)
        finally:
            scratch.close()
        if lo < self._end() and self._base < hi:  # keep the staging buffer's copy of those bytes the same
            a, b = max(lo, self._base, start), min(end, self._end())
            if b > a:
                self._buf[a - self._base:b - self._base] = view[a - start:b - start]
        os.ftruncate(self._fd, self._end())
        self._truncated_to = self._end()
        self._cursor = None if end == self._end() else end
        return len(view)
