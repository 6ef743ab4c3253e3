"""Never lose a user's file: outputs go to a temporary file beside the destination, are fsynced
and renamed into place; on any error (disk full, Ctrl-C, a bad tensor) the temporary file is
removed and the destination is untouched. Inputs are never written."""
from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

from sdtk.errors import OutputError

TEMP_SUFFIX = ".sdtk-partial"


def _name_start(name: str, limit: int = 32) -> str:
    """At most `limit` bytes (UTF-8) of the start of a file name, cut at a character boundary."""
    raw = os.fsencode(name)[:limit]
    return os.fsdecode(raw.decode("utf-8", "ignore").encode("utf-8")) if raw else "sdtk"


def same_file(a: "os.PathLike[str] | str", b: "os.PathLike[str] | str") -> bool:
    """True when two paths name the same file (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(dest: "os.PathLike[str] | str", inputs: Iterable = (), overwrite: bool = False) -> Path:
    """Refuse an output that is one of the inputs, or exists (unless overwrite), or has no folder."""
    dest = Path(dest)
    for src in inputs:
        if src is not None and same_file(dest, src):
            raise OutputError(dest, "is one of the inputs; sdtk never writes over an input (choose another output name)")
    if dest.is_dir():
        raise OutputError(dest, "is a folder; give a file name for the output")
    if dest.exists() and not overwrite:
        raise OutputError(dest, "already exists; pass --overwrite to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(dest, f"folder {parent} does not exist")
    return dest


WRITEBACK_INTERVAL_S = 0.25  # how often the kernel is asked to start writing an output's dirty pages


def _sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
        func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return func
    except (OSError, AttributeError):
        return None


class _EarlyWriteback(threading.Thread):
    """Start the disk writes of an output while it is still being produced (Linux
    sync_file_range(SYNC_FILE_RANGE_WRITE): asynchronous, nothing waits), so the final fsync has
    little left to wait for. Without it the kernel starts writing only at its dirty-memory
    threshold (10 % of RAM), so a 2 GB output was written to disk only during the fsync, after
    all the computing: compute time + disk time instead of the larger of the two."""

    WRITE = 2  # SYNC_FILE_RANGE_WRITE

    def __init__(self, fd: int):
        super().__init__(daemon=True, name="sdtk-writeback")
        self.fd, self.stop_event = fd, threading.Event()
        self.func = _sync_file_range()

    def run(self) -> None:
        while self.func is not None and not self.stop_event.wait(WRITEBACK_INTERVAL_S):
            if self.func(self.fd, 0, 0, self.WRITE) != 0:
                return

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join()


class OutputGroup:
    """Several outputs that appear together or not at all (`all_or_nothing()`): each finished
    output waits, fsynced, in its temporary file; `commit()` renames them all into place, and
    takes back the ones already renamed if one rename fails."""

    def __init__(self):
        self.pending: list = []  # AtomicOutput, finished and waiting

    def commit(self) -> None:
        done = []
        try:
            for out in self.pending:
                out._rename_into_place()
                done.append(out)
        except BaseException:
            for out in done:  # ours, just renamed: remove them so nothing of the group stays
                with contextlib.suppress(OSError):
                    os.unlink(out.dest)
            self.abort()
            raise
        self.pending = []

    def abort(self) -> None:
        for out in self.pending:
            out._discard()
        self.pending = []


_GROUP: "contextvars.ContextVar[Optional[OutputGroup]]" = contextvars.ContextVar("sdtk_output_group", default=None)


@contextlib.contextmanager
def all_or_nothing():
    """Every AtomicOutput finished inside the block (this thread) is committed when the block
    ends without error, all together; on any error none of them appears."""
    group = OutputGroup()
    token = _GROUP.set(group)
    saved = _interrupt_on_termination()  # SIGTERM/SIGHUP between two outputs still cleans up
    try:
        try:
            yield group
        except BaseException:
            group.abort()
            raise
        group.commit()
    finally:
        _GROUP.reset(token)
        _restore_handlers(saved)


class AtomicOutput:
    """`with AtomicOutput(dest, inputs=[...]) as f: f.write(...)`: all or nothing (inside
    `all_or_nothing()`, the rename waits for the whole group)."""

    def __init__(self, dest, inputs: Iterable = (), overwrite: bool = False, direct: bool = False):
        self.group = _GROUP.get()
        self.direct = direct  # a large output: written past the page cache (sdtk.directio)
        self.dest = check_output_path(dest, inputs, overwrite)
        if self.group is not None and any(same_file(o.dest, self.dest) or o.dest == self.dest for o in self.group.pending):
            raise OutputError(self.dest, "is written twice by one operation")
        self.overwrite = overwrite
        self.file: Optional[BinaryIO] = None
        self.temp_path: Optional[str] = None

    def __enter__(self) -> BinaryIO:
        parent = str(self.dest.parent) or "."
        self._saved_handlers = _interrupt_on_termination()
        self._writeback = None
        try:
            # a Ctrl-C between the file's creation and the end of __enter__ (where `with` has not
            # yet armed __exit__) would leave the temporary file behind: hold it until here
            with signals_held():
                try:
                    # short: a legal output name near the 255-byte limit must not fail once the random
                    # part and the suffix are added (the prefix keeps the start of the name, for humans)
                    fd, self.temp_path = tempfile.mkstemp(prefix="." + _name_start(self.dest.name) + ".",
                                                          suffix=TEMP_SUFFIX, dir=parent)
                except OSError as e:
                    raise OutputError(self.dest, f"cannot create a file in {parent}: {e.strerror}") from None
                if self.direct:
                    from sdtk.directio import DirectWriter

                    self.file = DirectWriter(fd)
                else:
                    self.file = os.fdopen(fd, "wb")
                self._writeback = _EarlyWriteback(fd)
                if sys.platform.startswith("linux") and not self.direct:
                    self._writeback.start()
        except BaseException:
            self._discard()
            _restore_handlers(self._saved_handlers)
            raise
        return self.file

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._finish(exc_type, exc)
        finally:
            _restore_handlers(getattr(self, "_saved_handlers", {}))

    def _finish(self, exc_type, exc) -> bool:
        assert self.file is not None and self.temp_path is not None
        self._writeback.stop()  # before the file is closed
        if exc_type is None:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.chmod(self.temp_path, 0o644 & ~_umask())
                if self.group is not None:
                    self.group.pending.append(self)  # renamed with the rest of the group
                    return False
                self._rename_into_place()
                return False
            except BaseException as e:
                self._discard()
                if isinstance(e, OSError):
                    raise os_error_to_output_error(self.dest, e) from None
                raise
        self._discard()
        if isinstance(exc, OSError):
            raise os_error_to_output_error(self.dest, exc) from None
        return False

    def _rename_into_place(self) -> None:
        if self.dest.exists() and not self.overwrite:  # appeared while we were writing
            raise OutputError(self.dest, "appeared while writing; pass --overwrite to replace it")
        try:
            os.replace(self.temp_path, self.dest)
        except OSError as e:
            raise os_error_to_output_error(self.dest, e) from None
        self.temp_path = None
        _fsync_dir(self.dest.parent)

    def _discard(self) -> None:
        if getattr(self, "_writeback", None) is not None:
            self._writeback.stop()
        try:
            if self.file is not None and not self.file.closed:
                self.file.close()
        except OSError:
            pass
        if self.temp_path and os.path.exists(self.temp_path):
            os.unlink(self.temp_path)


# Set once the process was asked to stop (Ctrl-C, SIGTERM, SIGHUP). A KeyboardInterrupt that
# lands inside a lock operation can surface as another error (CPython: "cannot release
# un-acquired lock" from a Condition interrupted in wait()); the CLI reads this to report it as
# the interruption it is.
interrupted = threading.Event()


def note_interrupt(signum, frame):
    """SIGINT handler for the CLI: Python's default behaviour, remembered."""
    interrupted.set()
    raise KeyboardInterrupt


def _terminated(signum, frame):
    interrupted.set()
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_termination() -> dict:
    """While an output is being written, SIGTERM and SIGHUP (`kill`, a closed terminal) unwind
    like Ctrl-C, so the temporary file is removed; by default they end Python on the spot and
    would leave a partial file behind. Only default handlers are replaced, only in the main thread."""
    saved = {}
    if threading.current_thread() is not threading.main_thread():
        return saved
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, _terminated)
    return saved


def _restore_handlers(saved: dict) -> None:
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def unwind_on_termination():
    """SIGTERM and SIGHUP unwind like Ctrl-C inside the block (see `_interrupt_on_termination`)."""
    saved = _interrupt_on_termination()
    try:
        yield
    finally:
        _restore_handlers(saved)


_HELD_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C, SIGTERM and SIGHUP during a short step that must not be cut in two (create a
    temporary file and take charge of it), then deliver them to their handlers on leaving, where
    the caller's cleanup is in place. Main thread only (elsewhere Python delivers no signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    saved = {}
    try:
        for sig in _HELD_SIGNALS:
            saved[sig] = signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    for signum, frame in held:
        handler = saved.get(signum)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            if signum == getattr(signal, "SIGINT", None):
                raise KeyboardInterrupt
            signal.raise_signal(signum)


def os_error_to_output_error(dest, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(dest, "disk full while writing; nothing was written (free some space and retry)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputError(dest, "permission denied while writing; nothing was written")
    return OutputError(dest, f"write failed ({e.strerror or e}); nothing was written")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_input(path: "os.PathLike[str] | str"):
    """Open a model file for reading, turning OS errors into one-line SdtkErrors."""
    from sdtk.errors import FormatError, SdtkError

    p = os.fspath(path)
    if os.path.isdir(p):
        raise FormatError(p, "is a folder, not a model file")
    try:
        return open(p, "rb")
    except FileNotFoundError:
        raise SdtkError(p, "no such file") from None
    except PermissionError:
        raise SdtkError(p, "permission denied") from None
    except OSError as e:
        raise SdtkError(p, f"cannot open: {e.strerror or e}") from None
