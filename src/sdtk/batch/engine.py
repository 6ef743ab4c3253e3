"""Engines that run the per-object function (`sdtk.batch.work.process_chunk`) over many objects.

Both pull chunks of objects from an iterator only as fast as results come back (backpressure: at
most `in_flight` chunks submitted), hand every finished chunk's rows to `on_rows` (the driver is
the only writer, so every object gets exactly one row), and retry chunks whose worker died:
a chunk of several objects is split into single objects when retried, so one object that kills
its worker (out of memory, a crash) is isolated and, after `max_attempts`, gets an error row of
its own instead of taking others down with it.

- `LocalEngine`: a process pool on this machine (a dead worker breaks the pool: it is rebuilt
  and the chunks in flight are retried).
- `RayEngine`: the same function as Ray tasks (`max_retries`: Ray resubmits tasks of dead
  workers and dead nodes elsewhere); `num_cpus` per task bounds the tasks per node (node CPUs /
  task CPUs); `address` joins an existing cluster. No scheduling of our own beyond the bounded
  submission window.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from sdtk.batch.listing import ObjectRef
from sdtk.batch.work import empty_row, process_chunk, ray_process_chunk
from sdtk.errors import SdtkError

Chunk = List[ObjectRef]
RowsCallback = Callable[[List[Dict[str, Any]]], None]
MAX_ATTEMPTS = 3


class _Window:
    """The submission window shared by both engines: new chunks, retried chunks, attempts."""

    def __init__(self, chunks: Iterator[Chunk], command: str, on_rows: RowsCallback, max_attempts: int):
        self.chunks, self.command, self.on_rows, self.max_attempts = chunks, command, on_rows, max_attempts
        self.retry: Deque[Tuple[Chunk, int]] = collections.deque()
        self.exhausted = False
        self.retried = 0

    def next(self) -> Optional[Tuple[Chunk, int]]:
        if self.retry:
            return self.retry.popleft()
        if self.exhausted:
            return None
        try:
            return next(self.chunks), 1
        except StopIteration:
            self.exhausted = True
            return None

    def failed(self, chunk: Chunk, attempt: int, why: str) -> None:
        """A chunk whose worker died: retry (split into single objects), or give up on it."""
        if attempt >= self.max_attempts:
            rows = []
            for ref in chunk:
                row = empty_row(ref, self.command)
                row.update(error=f"the worker died {attempt} times on this object ({why}); not retried again",
                           error_kind="worker-died", fetched_bytes=0, requests=0, seconds=0.0)
                rows.append(row)
            self.on_rows(rows)
            return
        self.retried += 1
        for ref in chunk:
            self.retry.append(([ref], attempt + 1))


class LocalEngine:
    name = "local"

    def __init__(self, workers: Optional[int] = None, max_attempts: int = MAX_ATTEMPTS):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.max_attempts = max_attempts
        self.retried = 0

    def describe(self) -> Dict[str, Any]:
        return {"engine": "local", "workers": self.workers}

    def run(self, command: str, chunks: Iterator[Chunk], settings: Dict[str, Any], on_rows: RowsCallback) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        window = _Window(chunks, command, on_rows, self.max_attempts)
        in_flight = 2 * self.workers
        ctx = multiprocessing.get_context("fork")  # fast; the driver holds no locks in other threads when it forks
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        pending: Dict[Any, Tuple[Chunk, int]] = {}
        try:
            while True:
                while len(pending) < in_flight:
                    item = window.next()
                    if item is None:
                        break
                    pending[pool.submit(process_chunk, command, item[0], settings)] = item
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    chunk, attempt = pending.pop(fut)
                    try:
                        rows = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        window.failed(chunk, attempt, "the process was killed")
                        continue
                    on_rows(rows)
                if broken:  # every chunk in flight went down with the pool: retry them on a new one
                    for chunk, attempt in pending.values():
                        window.failed(chunk, attempt, "the process pool broke")
                    pending.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.retried = window.retried


class RayEngine:
    name = "ray"

    def __init__(self, address: Optional[str] = None, task_cpus: float = 1.0, max_attempts: int = MAX_ATTEMPTS,
                 ship_code: bool = True, ray_retries: int = 3):
        self.address = address
        self.task_cpus = task_cpus
        self.max_attempts = max_attempts
        self.ship_code = ship_code
        self.ray_retries = ray_retries
        self.retried = 0
        self.cluster: Dict[str, Any] = {}

    def describe(self) -> Dict[str, Any]:
        return {"engine": "ray", "address": self.address, "task_cpus": self.task_cpus, **self.cluster}

    def _init(self):
        try:
            import ray
        except ImportError:
            raise SdtkError(None, "--engine ray needs Ray (pip install 'ray==2.60.0')") from None
        runtime_env = {}
        if self.ship_code:  # the cluster may not have this sdtk: ship the package with the job
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../sdtk (this file: sdtk/batch/engine.py)
            runtime_env["py_modules"] = [package]
        try:
            ray.init(address=self.address, runtime_env=runtime_env or None, logging_level="WARNING",
                     log_to_driver=False, include_dashboard=False if self.address is None else None,
                     configure_logging=True)
        except ConnectionError as e:
            raise SdtkError(None, f"cannot join the Ray cluster at {self.address}: {str(e).splitlines()[0][:200]}") from None
        except Exception as e:
            raise SdtkError(None, f"cannot start Ray ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return ray

    def run(self, command: str, chunks: Iterator[Chunk], settings: Dict[str, Any], on_rows: RowsCallback) -> None:
        import contextlib
        import sys

        # Ray prints cluster events (a node died...) from its own threads on stdout: keep stdout
        # for sdtk's output (--json) and let them go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            self._run(command, chunks, settings, on_rows)

    def _run(self, command: str, chunks: Iterator[Chunk], settings: Dict[str, Any], on_rows: RowsCallback) -> None:
        ray = self._init()
        try:
            from ray.exceptions import RayError

            cpus = float(ray.cluster_resources().get("CPU", 1))
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self.cluster = {"nodes": len(nodes), "cpus": cpus}
            slots = max(1, int(cpus / self.task_cpus))
            in_flight = 2 * slots
            task = ray.remote(num_cpus=self.task_cpus, max_retries=self.ray_retries, retry_exceptions=False)(ray_process_chunk)
            window = _Window(chunks, command, on_rows, self.max_attempts)
            settings_ref = ray.put(settings)
            pending: Dict[Any, Tuple[Chunk, int]] = {}
            while True:
                while len(pending) < in_flight:
                    item = window.next()
                    if item is None:
                        break
                    pending[task.remote(command, item[0], settings_ref)] = item
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                for ref in ready:
                    chunk, attempt = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except RayError as e:  # Ray's own retries are spent (worker or node died again)
                        window.failed(chunk, attempt, type(e).__name__)
                        continue
                    on_rows(rows)
            self.retried = window.retried
        finally:
            ray.shutdown()
