"""Shared test helpers. Area-specific helpers live in tests/helpers_<area>.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Fuzz tests run the same examples on every run (a CI run must not fail by luck of the draw);
# SDTK_HYPOTHESIS_PROFILE=explore draws new ones, to hunt for bugs on purpose. A bug found that
# way is fixed and kept as an explicit @example.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("SDTK_HYPOTHESIS_PROFILE", "repeatable"))

SRC = str(Path(__file__).resolve().parent.parent / "src")

# Tests never touch the user's hash cache: one fresh cache per test session (children inherit it).
if "SDTK_HASH_CACHE" not in os.environ:
    import tempfile

    os.environ["SDTK_HASH_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="sdtk-test-cache-"), "hashes.sqlite3")

# ... nor the user's trash (sdtk serve's "remove" moves files to $XDG_DATA_HOME/Trash): a fresh one
if not os.environ.get("SDTK_TEST_XDG_SET"):
    import tempfile

    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="sdtk-test-xdg-")
    os.environ["SDTK_TEST_XDG_SET"] = "1"


def run_cli(*args, cwd=None, input=None, env=None):
    """Run `python -m sdtk ARGS` on this checkout's code; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("COLUMNS", "200")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sdtk", *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, env=full_env, timeout=600)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture
def cli():
    return run_cli


def torch_or_skip():
    """torch is a test oracle only (CI installs torch==2.13.0); skip a test when it is absent."""
    return pytest.importorskip("torch")
