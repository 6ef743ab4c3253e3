"""sha256 of a safetensors file's data section (every byte after the header), computed while the
file is being written, by reading back what the writer has written (page cache) on another core.

This is ModelSpec's `modelspec.hash_sha256` ("0x" + 64 hex; ModelSpec 1.0.0: sha256 of the tensor
bytes, header excluded), kohya's `sshs_model_hash` and A1111's `hashes-addnet` (both without the
prefix; sd-scripts `library/train_util.py:addnet_hash_safetensors`), and the file's AutoV3: it does
not depend on the metadata, so it can go into the header that is rewritten at the end.
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Optional

CHUNK = 8 << 20


class DataSectionHasher:
    """`start(path, data_start)` once the header is written, `advance(end)` whenever bytes up to
    `end` are in the file, `finish(end) -> hex` at the end; `abort()` on failure."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._cond = threading.Condition()
        self._target = 0
        self._closing = False
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._fd = -1
        self._pos = 0
        self.hexdigest: Optional[str] = None

    def start(self, path: "os.PathLike[str] | str", data_start: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._pos = self._target = data_start
        self._thread = threading.Thread(target=self._run, daemon=True, name="sdtk-output-hash")
        self._thread.start()

    def advance(self, end: int) -> None:
        with self._cond:
            if end > self._target:
                self._target = end
                self._cond.notify()

    def finish(self, end: int) -> str:
        self.advance(end)
        self._stop()
        if self._error is not None:
            raise self._error
        if self._pos != end:
            raise OSError(f"read back {self._pos} of {end} bytes of the output")
        self.hexdigest = self._hash.hexdigest()
        return self.hexdigest

    def abort(self) -> None:
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while True:
                with self._cond:
                    while self._target <= self._pos and not self._closing:
                        self._cond.wait()
                    target, closing = self._target, self._closing
                while self._pos < target:
                    n = os.preadv(self._fd, [view[:min(CHUNK, target - self._pos)]], self._pos)
                    if n <= 0:
                        raise OSError("the output ended before the bytes written to it")
                    self._hash.update(view[:n])
                    self._pos += n
                if closing:
                    with self._cond:
                        if self._target <= self._pos:
                            return
        except BaseException as e:  # reported by finish()
            self._error = e
