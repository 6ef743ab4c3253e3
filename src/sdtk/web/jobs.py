"""The job queue: operations run one at a time in a worker thread, over the same library calls
the CLI makes; progress is read by the event stream; cancel is the same clean interrupt as
Ctrl-C (an exception raised from the operation's own progress callback unwinds the writer, whose
temporary file is removed: no partial file, the destination untouched).

Every job is logged, one JSON line when it ends, in `<state folder>/jobs.log`."""
from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

from sdtk.errors import SdtkError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
KEEP_FINISHED = 200  # finished jobs kept in memory for the page


class JobCancelled(BaseException):
    """Raised inside a job's callbacks when the user cancelled it (a BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way swallows it)."""


@dataclass
class Job:
    id: int
    op: str
    title: str
    params: Dict[str, Any]
    state: str = QUEUED
    done: int = 0
    total: int = 0
    detail: str = ""
    log: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def percent(self) -> int:
        if self.state == DONE:
            return 100
        return int(100 * self.done / self.total) if self.total else 0

    def as_json(self) -> Dict[str, Any]:
        return {"id": self.id, "op": self.op, "title": self.title, "params": self.params, "state": self.state,
                "percent": self.percent, "detail": self.detail, "log": self.log, "result": self.result,
                "error": self.error, "created": self.created, "started": self.started, "finished": self.finished}


class JobContext:
    """What a running operation gets: progress reporting that doubles as the cancel point, a log,
    its own library connection, the server's settings."""

    def __init__(self, queue: "JobQueue", job: Job):
        self.queue, self.job = queue, job
        self.settings = queue.settings
        self._conn = None

    @property
    def conn(self):
        if self._conn is None:
            self._conn = self.queue.connect()
        return self._conn

    def check(self) -> None:
        if self.job.cancel_requested.is_set():
            raise JobCancelled()

    def progress(self, done: int, total: Optional[int] = None, detail: Optional[str] = None) -> None:
        self.check()
        job = self.job
        job.done = done
        if total is not None:
            job.total = total
        if detail is not None:
            job.detail = detail
        self.queue.changed()
        if self.settings.progress_delay:
            time.sleep(self.settings.progress_delay)
            self.check()

    def log(self, line: str) -> None:
        self.job.log.append(line)
        self.queue.changed()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


Runner = Callable[[JobContext, Dict[str, Any]], Dict[str, Any]]


class JobQueue:
    """Jobs in order; one worker thread runs them one after the other (model files are large: two
    at once would only fight over the disk)."""

    def __init__(self, settings, connect: Callable, runners: Dict[str, Runner],
                 after_job: Optional[Callable[[Job], None]] = None):
        self.settings = settings
        self.after_job = after_job  # runs before a job is shown finished (the page index takes its output in)
        self.connect = connect
        self.runners = runners
        self._jobs: Dict[int, Job] = {}
        self._pending: Deque[int] = deque()
        self._lock = threading.Condition()
        self._next_id = 1
        self.version = 0
        self._stop = False
        self._thread = threading.Thread(target=self._work, daemon=True, name="sdtk-web-jobs")
        self._thread.start()

    # -- observers ---------------------------------------------------------------------------
    def changed(self) -> None:
        with self._lock:
            self.version += 1
            self._lock.notify_all()

    def jobs(self) -> List[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: -j.id)

    def get(self, job_id: int) -> Optional[Job]:
        return self._jobs.get(job_id)

    def active_outputs(self) -> List[str]:
        """Output paths of queued and running jobs (two tabs asking for the same file)."""
        out = []
        for j in self._jobs.values():
            if j.state in (QUEUED, RUNNING) and j.params.get("output_path"):
                out.append(j.params["output_path"])
        return out

    # -- commands ----------------------------------------------------------------------------
    def submit(self, op: str, title: str, params: Dict[str, Any]) -> Job:
        if op not in self.runners:
            raise SdtkError(None, f"unknown operation {op!r}")
        with self._lock:
            target = params.get("output_path")
            if target and target in self.active_outputs():
                raise SdtkError(target, "another job is already writing this file; wait for it or choose another name")
            job = Job(self._next_id, op, title, params)
            self._next_id += 1
            self._jobs[job.id] = job
            self._pending.append(job.id)
            self._forget_old()
            self.version += 1
            self._lock.notify_all()
        return job

    def cancel(self, job_id: int) -> Optional[Job]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return job
            job.cancel_requested.set()
            if job.state == QUEUED:
                self._pending.remove(job_id)
                self._finish(job, CANCELLED, "cancelled before it started")
            self.version += 1
            self._lock.notify_all()
        return job

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            for job in self._jobs.values():
                job.cancel_requested.set()
            self._lock.notify_all()
        self._thread.join(timeout)

    def wait_for_change(self, seen: int, timeout: float) -> int:
        with self._lock:
            if self.version == seen:
                self._lock.wait(timeout)
            return self.version

    # -- the worker --------------------------------------------------------------------------
    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for j in sorted(finished, key=lambda j: j.id)[:-KEEP_FINISHED]:
            del self._jobs[j.id]

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                job = self._jobs[self._pending.popleft()]
                job.state, job.started = RUNNING, time.time()
                self.version += 1
                self._lock.notify_all()
            self._run(job)

    def _run(self, job: Job) -> None:
        ctx = JobContext(self, job)
        try:
            job.result = self.runners[job.op](ctx, job.params) or {}
            state, error = DONE, None
        except JobCancelled:
            state, error = CANCELLED, "cancelled: stopped cleanly, nothing was written"
        except SdtkError as e:
            state, error = FAILED, str(e)
        except KeyboardInterrupt:
            state, error = CANCELLED, "interrupted; nothing was written"
        except Exception as e:  # a bug: keep the server running, say what happened
            state, error = FAILED, f"internal error ({type(e).__name__}: {e})"
            job.log.append(traceback.format_exc(limit=5))
        finally:
            ctx.close()
        if self.after_job is not None:
            try:
                self.after_job(job)
            except Exception as e:  # never lose the job's own outcome
                job.log.append(f"after the job: {type(e).__name__}: {e}")
        with self._lock:
            self._finish(job, state, error)
            self.version += 1
            self._lock.notify_all()

    def _finish(self, job: Job, state: str, error: Optional[str]) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        if state == DONE:
            job.done = job.total = max(job.total, 1)
        self._append_log(job)

    def _append_log(self, job: Job) -> None:
        try:
            folder = self.settings.state_folder
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "jobs.log"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({k: v for k, v in job.as_json().items() if k != "log"}, default=str) + "\n")
        except OSError:
            pass  # the log is a convenience; a read-only state folder must not fail the job
