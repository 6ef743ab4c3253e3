"""An sdtk serve app over a sample library, driven in-process with Starlette's TestClient
(HTTP-level tests; the browser tests start the real server)."""
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from helpers_web import sample_library  # noqa: E402
from sdtk.library import open_library, scan_library  # noqa: E402
from sdtk.web.app import create_app  # noqa: E402
from sdtk.web.settings import ServeSettings  # noqa: E402

PORT = 8765
ORIGIN = f"http://127.0.0.1:{PORT}"
HX = {"Origin": ORIGIN, "HX-Request": "true"}


def build(base: Path) -> dict:
    sample = sample_library(base)
    conn = open_library(base / "lib.db")
    scan_library(conn, [str(sample["root"])])
    conn.close()
    return sample


@contextmanager
def client_for(base: Path, sample: dict, **settings):
    s = ServeSettings(db=base / "lib.db", roots=[os.path.realpath(sample["root"])], port=PORT, state_dir=base / "state",
                      **settings)
    app = create_app(s)
    web = app.app.state.web
    try:
        with TestClient(app, base_url=ORIGIN) as client:
            client.web = web
            yield client
    finally:
        web.queue.stop()


def file_id(client, path) -> int:
    row = client.web.conn.execute("SELECT id FROM files WHERE path = ?", (os.path.realpath(path),)).fetchone()
    assert row is not None, f"{path} is not indexed"
    return row["id"]


def wait_job(client, job_id: int, states=("done", "failed", "cancelled"), timeout: float = 120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.web.queue.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {client.web.queue.get(job_id).state} after {timeout} s")


def last_job(client):
    return client.web.queue.jobs()[0]
