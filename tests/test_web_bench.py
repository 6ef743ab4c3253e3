"""The issue's bounds for `sdtk serve` with 30,000 indexed files: the first render of the library
page within 1 s, a search within 200 ms (in-process requests; bench/bench_web.py measures the
same over HTTP against the real server and writes bench/results/web.md).

Wall-time bounds mean something only on a machine that is not overloaded: when the load average
exceeds the number of cores the figures are reported and the bounds are not asserted (the pages
and counts still are)."""
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_web import QUERIES, build_library  # noqa: E402


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    base = tmp_path_factory.mktemp("web30k")
    db = build_library(base, files=30_000, real=100)
    return base, db


def test_30000_files_first_render_and_searches(big):
    from starlette.testclient import TestClient
    from sdtk.web.app import create_app
    from sdtk.web.settings import ServeSettings

    base, db = big
    app = create_app(ServeSettings(db=db, roots=[str((base / "models").resolve())], port=8765, state_dir=base / "state"))
    try:
        with TestClient(app, base_url="http://127.0.0.1:8765") as c:
            t = time.perf_counter()
            page = c.get("/")
            first = time.perf_counter() - t
            assert "30,000 files" in page.text
            medians = {}
            for name, path in QUERIES:
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    assert c.get(path).status_code == 200
                    times.append(time.perf_counter() - t)
                medians[name] = statistics.median(times)
            from sdtk.web import catalog  # the in-memory index counts what SQL counts
            web = app.app.state.web
            for q in (catalog.Query(q="model_0001"), catalog.Query(q="word1"), catalog.Query(dupes=True), catalog.Query(kind="lora")):
                assert catalog.page(web.conn, q, web.settings.roots, web.index)[1] == catalog.page(web.conn, q, web.settings.roots)[1] > 0
            assert '"count" role="status">0 files<' in c.get("/library/rows?q=no-such-model-name").text
    finally:
        app.app.state.web.queue.stop()
    figures = f"first render {first * 1000:.0f} ms; " + "; ".join(f"{k} {v * 1000:.0f} ms" for k, v in medians.items())
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        pytest.skip(f"machine overloaded (load {load:.1f} on {cores} cores): bounds not asserted; {figures}")
    assert first <= 1.0, figures
    assert max(medians.values()) <= 0.2, figures
