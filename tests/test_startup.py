"""Start-up: header-only commands never import numpy or ml_dtypes (ml_dtypes 0.7 alone takes over
a second to import), and the `--json` paths never import rich; the shortcuts that make this so
(lazy dtype table, lazy command modules, plain parameter coercion) give the same results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

from conftest import SRC

# Runs the CLI in this interpreter and reports which heavy modules were imported by then.
PROBE = """
import json, sys
sys.path.insert(0, {src!r})
from sdtk.cli.main import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
sys.stdout.flush()
sys.stderr.write("\\nMODULES=" + json.dumps([m for m in ("numpy", "ml_dtypes", "rich", "pydantic") if m in sys.modules]) + "\\n")
sys.exit(code)
"""


def loaded_modules(argv: List[str], env: Optional[dict] = None):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(src=SRC, argv=argv)], capture_output=True, text=True,
                          timeout=120, env=env)
    marker = proc.stderr.rsplit("MODULES=", 1)
    assert len(marker) == 2, proc.stderr
    return proc.returncode, json.loads(marker[1]), proc.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.samples import layout_plan, load_layout, write_sparse_safetensors

    folder = tmp_path_factory.mktemp("startup")
    flux, sd15, ckpt = folder / "flux1-dev.safetensors", folder / "sd15.safetensors", folder / "sd15.ckpt"
    write_sparse_safetensors(flux, load_layout("flux1-dev"))
    write_sparse_safetensors(sd15, load_layout("sd15-emaonly"))
    write_torch_zip(ckpt, layout_plan(load_layout("sd15-emaonly")), wrap="state_dict", sparse_zeros=True, overwrite=True)
    return {"flux": flux, "sd15": sd15, "ckpt": ckpt, "folder": folder}


def test_importing_the_cli_and_inspecting_a_header_imports_no_ml_dtypes(files):
    code, modules, out = loaded_modules(["inspect", "--json", str(files["flux"])])
    assert code == 0
    assert json.loads(out)["files"][0]["architecture"] == "flux-1-dev"  # it did the work
    assert "ml_dtypes" not in modules and "numpy" not in modules
    assert "rich" not in modules and "pydantic" not in modules


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["inspect", "{sd15}"],  # the human report (rich), position_ids values read without numpy
    ["inspect", "--json", "{ckpt}"],
    ["inspect", "{folder}"],
    ["scan", "{flux}"],
    ["scan", "--json", "{ckpt}"],
])
def test_header_only_commands_import_neither_numpy_nor_ml_dtypes(files, argv):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, modules, out = loaded_modules(argv)
    assert code in (0, 1), out
    assert "ml_dtypes" not in modules and "numpy" not in modules, (argv, modules)


def test_help_lists_every_command_and_runs_without_ml_dtypes():
    from sdtk.cli.main import COMMAND_MODULES

    code, modules, out = loaded_modules(["--help"], env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert code == 0
    for name in COMMAND_MODULES:
        assert f" {name} " in out
    assert "ml_dtypes" not in modules


def test_every_registered_command_is_in_the_lazy_table():
    """A command module registering a command the lazy table does not name would be unreachable."""
    import typer

    from sdtk.cli.main import COMMAND_MODULES, register_all

    full = typer.Typer()
    register_all(full)
    names = {c.name or c.callback.__name__ for c in full.registered_commands} | {g.name for g in full.registered_groups}
    assert names == set(COMMAND_MODULES)


def test_dtype_table_needs_no_numpy_and_agrees_with_it():
    """Naming a dtype is a table look-up; its numpy dtype (resolved on use) has the table's size."""
    code = ("import sys; sys.path.insert(0, %r); from sdtk.tensors import DTYPES, dtype; "
            "assert dtype('bf16').itemsize == 2 and dtype('F8_E4M3').short == 'fp8-e4m3fn'; "
            "assert 'numpy' not in sys.modules and 'ml_dtypes' not in sys.modules" % SRC)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    import numpy as np

    from sdtk.tensors import DTYPES, dtype_of_numpy

    for d in DTYPES.values():
        assert d.numpy.itemsize == d.itemsize
        assert d.numpy.byteorder in ("<", "|", "=")
        assert dtype_of_numpy(d.numpy) is d
        assert dtype_of_numpy(d.numpy.newbyteorder(">")) is d
    assert DTYPES["F16"].numpy == np.dtype("<f2")


@pytest.mark.parametrize("annotation,value,expected", [
    (str, "a b", "a b"), (Path, "x/y", Path("x/y")), (Optional[Path], "m.safetensors", Path("m.safetensors")),
    (List[Path], ("a", "b"), [Path("a"), Path("b")]), (Optional[List[Path]], ("a",), [Path("a")]),
    (List[str], ("k",), ["k"]), (bool, True, True), (Optional[bool], False, False),
])
def test_plain_parameters_coerce_as_typer_does(annotation, value, expected):
    """The pydantic-free coercion gives what typer's own gives for the same annotation."""
    pytest.importorskip("typer._coercion")
    from typer._coercion import build_runtime_param, resolve_type_descriptor
    from typer.models import OptionInfo

    from sdtk.cli.light_params import converter_for

    convert, is_list = converter_for(annotation)
    ours = [convert(v) for v in value] if is_list else convert(value)
    theirs = build_runtime_param(resolve_type_descriptor(annotation, OptionInfo()))._coerce_value(value, param=None, ctx=None)
    assert ours == theirs == expected
    assert type(ours) is type(theirs)


@pytest.mark.parametrize("annotation", [int, float, Optional[float]])
def test_numbers_keep_typers_coercion(annotation):
    from sdtk.cli.light_params import converter_for

    assert converter_for(annotation) is None


def test_position_ids_read_without_numpy_match_numpy(tmp_path):
    """The struct path of the position_ids check finds the same damage as reading with numpy."""
    import numpy as np

    from sdtk.formats import open_model
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.identify.checks import _small_values
    from sdtk.tensors import from_array

    arrays = {"i64": np.array([0, 1, 5, 3], "<i8"), "f32": np.array([0.0, 0.9999, np.nan, 3.0], "<f4"),
              "f16": np.array([0, 1, 2, np.inf], "<f2"), "u8": np.array([0, 1, 2, 255], "u1")}
    write_safetensors(tmp_path / "v.safetensors", [from_array(k, v) for k, v in arrays.items()])
    with open_model(tmp_path / "v.safetensors") as cat:
        for key, arr in arrays.items():
            t = cat.tensors[key]
            assert t.span is not None
            got = _small_values(t)
            want = arr.astype(np.float64 if arr.dtype.kind == "f" else np.int64).tolist()
            assert [str(v) for v in got] == [str(v) for v in want]


@pytest.mark.parametrize("extra", [[], ["--dtype", "fp16"]])
def test_converting_fp32_or_casting_to_fp16_imports_no_ml_dtypes(tmp_path, extra):
    """A container change or an fp16 cast touches tensor values but never bf16/fp8 ones: ops.cast
    decides overflow from its finite-max table, so ml_dtypes (1.5 s with 0.7) is not imported."""
    import numpy as np

    from sdtk.formats.safetensors import read_safetensors
    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.tensors import from_array

    src, out = tmp_path / "m.ckpt", tmp_path / "m.safetensors"
    values = np.linspace(-3, 3, 4096, dtype=np.float32).reshape(64, 64)
    write_torch_zip(src, [from_array("model.diffusion_model.w", values)], wrap="state_dict", overwrite=True)
    code, modules, _ = loaded_modules(["convert", str(src), "-o", str(out), "--no-source-hash", *extra])
    assert code == 0 and out.exists()
    assert "ml_dtypes" not in modules and "numpy" in modules  # values were touched
    with read_safetensors(out) as cat:
        got = cat.tensors["model.diffusion_model.w"].read()
    assert got.tobytes() == (values.astype(np.float16) if extra else values).tobytes()


def test_version_is_pyprojects_and_the_cli_prints_it():
    """sdtk.version.__version__ (what lineage records and `--version` print) is the packaged version."""
    import re

    from sdtk import __version__ as facade
    from sdtk.version import __version__

    pyproject = (Path(SRC).parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == __version__ == facade
    out = subprocess.run([sys.executable, "-m", "sdtk", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.splitlines()[0] == f"sdtk {__version__}", out.stderr
