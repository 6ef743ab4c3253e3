"""AtomicOutput and friends: an output appears complete or not at all, inputs are never written,
and every refusal or failure is one SdtkError naming the file, with nothing left behind."""
import errno
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import SRC
from sdtk import fileio
from sdtk.errors import EXIT_BAD_INPUT, OutputError, SdtkError
from sdtk.fileio import TEMP_SUFFIX, AtomicOutput, check_output_path, open_input
from sdtk.formats.safetensors import write_safetensors
from sdtk.samples import layout_plan, load_layout


def listing(folder):
    return sorted(os.listdir(folder))


# --- all or nothing -------------------------------------------------------------------------


def test_success_renames_a_complete_file_into_place(tmp):
    dest = tmp / "out.bin"
    with AtomicOutput(dest) as f:
        f.write(b"hello")
        partial = [n for n in listing(tmp) if n.endswith(TEMP_SUFFIX)]
        assert len(partial) == 1 and partial[0].startswith(".out.bin.")  # beside the destination
        assert not dest.exists()  # nothing at the destination until it is complete
    assert dest.read_bytes() == b"hello"
    assert listing(tmp) == ["out.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o644 & ~mask


@pytest.mark.parametrize("exc", [ValueError("bad tensor"), KeyboardInterrupt()])
def test_an_exception_leaves_nothing_and_propagates(tmp, exc):
    dest = tmp / "out.bin"
    with pytest.raises(type(exc)):
        with AtomicOutput(dest) as f:
            f.write(b"x" * 100_000)
            raise exc
    assert listing(tmp) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_keeps_the_existing_destination(tmp, exc):
    dest = tmp / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with AtomicOutput(dest, overwrite=True) as f:
            f.write(b"new")
            raise exc
    assert dest.read_bytes() == b"old"
    assert listing(tmp) == ["out.bin"]


def test_ctrl_c_in_a_real_process_leaves_nothing(tmp):
    """SIGINT while `sdtk`-style code is writing: exit by KeyboardInterrupt, no partial file."""
    script = (
        "import sys, time, os\n"
        "from sdtk.fileio import AtomicOutput\n"
        "with AtomicOutput(sys.argv[1]) as f:\n"
        "    f.write(b'x' * 1000); f.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(30)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp / "out.bin")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(n.endswith(TEMP_SUFFIX) for n in listing(tmp))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert listing(tmp) == []


def test_destination_appearing_while_writing_is_not_replaced(tmp):
    dest = tmp / "out.bin"
    with pytest.raises(OutputError, match="appeared while writing"):
        with AtomicOutput(dest) as f:
            f.write(b"ours")
            dest.write_bytes(b"someone else's")
    assert dest.read_bytes() == b"someone else's"
    assert listing(tmp) == ["out.bin"]


# --- refusals before anything is written ----------------------------------------------------


def test_refuses_writing_over_an_input(tmp, monkeypatch):
    src = tmp / "model.safetensors"
    src.write_bytes(b"precious")
    with pytest.raises(OutputError, match="is one of the inputs") as e:
        AtomicOutput(src, inputs=[src], overwrite=True)
    assert e.value.path == str(src)
    # the same file under another spelling
    with pytest.raises(OutputError, match="is one of the inputs"):
        AtomicOutput(tmp / "." / "model.safetensors", inputs=[src], overwrite=True)
    monkeypatch.chdir(tmp)
    with pytest.raises(OutputError, match="is one of the inputs"):
        AtomicOutput("model.safetensors", inputs=[src], overwrite=True)
    assert src.read_bytes() == b"precious"


def test_refuses_a_hard_link_or_symlink_to_an_input(tmp):
    src = tmp / "model.safetensors"
    src.write_bytes(b"precious")
    hard, soft = tmp / "hard.safetensors", tmp / "soft.safetensors"
    os.link(src, hard)
    os.symlink(src, soft)
    for dest in (hard, soft):
        with pytest.raises(OutputError, match="is one of the inputs"):
            AtomicOutput(dest, inputs=[src], overwrite=True)
    # and the other way round: the input given through a link
    with pytest.raises(OutputError, match="is one of the inputs"):
        AtomicOutput(src, inputs=[soft], overwrite=True)
    assert src.read_bytes() == b"precious" and hard.read_bytes() == b"precious"


def test_refuses_an_existing_file_without_overwrite(tmp):
    dest = tmp / "out.safetensors"
    dest.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists; pass --overwrite") as e:
        AtomicOutput(dest)
    assert str(e.value).startswith(str(dest))
    with AtomicOutput(dest, overwrite=True) as f:
        f.write(b"replaced")
    assert dest.read_bytes() == b"replaced"


def test_refuses_a_folder_and_a_missing_folder(tmp):
    with pytest.raises(OutputError, match="is a folder"):
        AtomicOutput(tmp)
    missing = tmp / "no" / "such" / "out.safetensors"
    with pytest.raises(OutputError, match="does not exist") as e:
        AtomicOutput(missing)
    assert e.value.path == str(missing)
    assert listing(tmp) == []


def test_check_output_path_ignores_missing_inputs_and_none(tmp):
    dest = tmp / "out.bin"
    assert check_output_path(dest, inputs=[None, tmp / "absent.bin"]) == dest


# --- OS failures: permission denied, disk full ----------------------------------------------


def _folder_is_writable_anyway(folder) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return False
    probe.unlink()
    return True


def test_permission_denied_folder_real(tmp):
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if _folder_is_writable_anyway(locked):
            pytest.skip("running with privileges that ignore folder permissions (root); see the simulated test")
        with pytest.raises(OutputError, match="cannot create a file in") as e:
            with AtomicOutput(locked / "out.bin") as f:
                f.write(b"x")
        assert e.value.path == str(locked / "out.bin")
        assert listing(locked) == []
    finally:
        locked.chmod(0o755)


def test_permission_denied_folder_simulated(tmp, monkeypatch):
    """The same path through the code with the OS refusal simulated (works as root too)."""
    def refuse(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError) as e:
        with AtomicOutput(tmp / "out.bin") as f:
            f.write(b"x")
    assert str(e.value) == f"{tmp / 'out.bin'}: cannot create a file in {tmp}: Permission denied"
    assert listing(tmp) == []


def test_disk_full_during_write_leaves_nothing(tmp):
    dest = tmp / "out.bin"
    with pytest.raises(OutputError, match="disk full while writing; nothing was written") as e:
        with AtomicOutput(dest) as f:
            f.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.path == str(dest)
    assert listing(tmp) == []


def test_disk_full_at_fsync_leaves_nothing(tmp, monkeypatch):
    """Delayed allocation: the write succeeded, the flush to disk fails."""
    dest = tmp / "out.bin"
    dest.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OutputError, match="disk full"):
        with AtomicOutput(dest, overwrite=True) as f:
            f.write(b"new")
    assert dest.read_bytes() == b"old"
    assert listing(tmp) == ["out.bin"]


def test_write_failing_in_a_real_process_exits_2_with_one_line(tmp):
    """A real kernel write failure (file-size limit: EFBIG) in the middle of `sdtk convert`:
    exit code 2, a one-line message naming the output, no traceback, no partial file."""
    src = tmp / "vae.safetensors"
    write_safetensors(src, layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=4))
    assert src.stat().st_size > 2 << 20
    dest = tmp / "out.safetensors"
    limit = 1 << 20
    code = (
        "import resource, runpy, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.argv = ['sdtk', 'convert', {str(src)!r}, {str(dest)!r}]\n"
        "runpy.run_module('sdtk', run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC, COLUMNS="200")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == EXIT_BAD_INPUT, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(dest) in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert "File too large" in lines[0] and "nothing was written" in lines[0]
    assert listing(tmp) == ["vae.safetensors"]


# --- opening inputs -------------------------------------------------------------------------


def test_open_input_errors_name_the_file(tmp):
    with pytest.raises(SdtkError, match="no such file") as e:
        open_input(tmp / "absent.ckpt")
    assert e.value.path == str(tmp / "absent.ckpt")
    with pytest.raises(SdtkError, match="is a folder"):
        open_input(tmp)


def test_open_input_permission_denied(tmp, monkeypatch):
    path = tmp / "secret.ckpt"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        try:
            open(path, "rb").close()
            readable = True
        except PermissionError:
            readable = False
        if readable:  # root: simulate the refusal at the same call
            real_open = open

            def refusing_open(p, *a, **kw):
                if os.fspath(p) == str(path):
                    raise PermissionError(errno.EACCES, "Permission denied")
                return real_open(p, *a, **kw)

            monkeypatch.setattr("builtins.open", refusing_open)
        with pytest.raises(SdtkError, match="permission denied") as e:
            open_input(path)
        assert e.value.path == str(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_kill_while_writing_leaves_nothing(tmp, sig):
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) unwinds like Ctrl-C: no partial file.
    (By default Python dies on the spot and would leave the temporary file behind.)"""
    # a terminal session's default SIGHUP: under `nohup` the child would inherit an ignored one,
    # which sdtk keeps ignored (fileio only replaces default handlers)
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        "from sdtk.fileio import AtomicOutput\n"
        "with AtomicOutput(sys.argv[1]) as f:\n"
        "    f.write(b'x' * 1000); f.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(30)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp / "out.bin")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(n.endswith(TEMP_SUFFIX) for n in listing(tmp))
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert listing(tmp) == []


def test_cli_killed_during_convert_exits_130_and_leaves_nothing(tmp):
    src = tmp / "vae.safetensors"
    write_safetensors(src, layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=2))
    dest = tmp / "out.safetensors"
    # a convert that blocks inside the write: the plan's loader waits until it is killed
    code = (
        "import sys, time, runpy\n"
        "import sdtk.formats.safetensors as st\n"
        "real = st._as_le_bytes\n"
        "def slow(t, arr):\n"
        "    print('writing', flush=True); time.sleep(30); return real(t, arr)\n"
        "st._as_le_bytes = slow\n"
        f"sys.argv = ['sdtk', 'convert', '--no-source-hash', {str(src)!r}, {str(dest)!r}]\n"
        "runpy.run_module('sdtk', run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert listing(tmp) == ["vae.safetensors"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_just_after_the_temporary_file_is_created_leaves_nothing(tmp, monkeypatch, sig):
    """The race CI once hit: Ctrl-C landing after mkstemp but before `with` had armed __exit__
    left a `.sdtk-partial` behind. The signal is now held over that step and delivered after it."""
    real_fdopen = os.fdopen

    def fdopen_then_signal(fd, *a, **k):
        os.kill(os.getpid(), sig)  # delivered at the next bytecode boundary, inside __enter__
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(fileio.os, "fdopen", fdopen_then_signal)
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(tmp / "out.bin") as f:
            f.write(b"never")
    assert os.listdir(tmp) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_signals_held_delivers_a_held_ctrl_c_on_leaving():
    seen = []
    before = signal.getsignal(signal.SIGINT)  # Python's default, or the CLI's (an earlier in-process run)
    with pytest.raises(KeyboardInterrupt):
        with fileio.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecode boundaries: the handler runs (and holds it) in here
                seen.append(1)
            seen.append("inside, not interrupted")
    assert seen[-1] == "inside, not interrupted"
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_just_after_the_temporary_folder_is_created_leaves_nothing(tmp, monkeypatch):
    from sdtk.ops.diffusers import write as folder_write

    real_mkdtemp = folder_write.tempfile.mkdtemp

    def mkdtemp_then_signal(*a, **k):
        path = real_mkdtemp(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(folder_write.tempfile, "mkdtemp", mkdtemp_then_signal)
    plan = folder_write.FolderPlan(family="sd15", pipeline="StableDiffusionPipeline", files=[], components={})
    with pytest.raises(KeyboardInterrupt):
        folder_write.write_folder(plan, tmp / "out")
    assert os.listdir(tmp) == []
