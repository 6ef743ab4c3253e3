"""The real `sdtk serve` process for browser tests, and Debian's chromium for Playwright.

Playwright's own browser download is not used: Playwright drives the distribution's chromium
through `executable_path` (CI installs it with apt, see .ci/run). Without a chromium the
browser tests skip, saying so."""
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import SRC

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_or_skip() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    env = os.environ.get("SDTK_CHROMIUM")
    for path in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("chromium")
    if found:
        return found
    pytest.skip("no chromium found (apt-get install chromium, or set SDTK_CHROMIUM): the browser tests need a real browser")


@contextmanager
def running_server(root: Path, db: Path, state: Path, progress_delay: float = 0.0, timeout: float = 60):
    """`python -m sdtk serve` on 127.0.0.1 and a free port; yields its URL; stopped by pid."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SDTK_WEB_PROGRESS_DELAY=str(progress_delay), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdtk", "serve", "--root", str(root), "--db", str(db), "--port", "0",
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url, seen, end = None, [], time.monotonic() + timeout
        while url is None:
            if time.monotonic() > end or proc.poll() is not None:
                raise AssertionError("sdtk serve did not start: " + "".join(seen) + (proc.stdout.read() if proc.poll() is not None else ""))
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                seen.append(line)
                if line.startswith("sdtk serve: http://"):
                    url = line.split()[2]
        yield url.rstrip("/")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
