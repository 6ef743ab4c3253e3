"""Reports fit the terminal: the demo's reports (and every language's verbose report, and the
folder listing) rendered at 80 and 60 columns have no line wider than that; labels never break
and long key prefixes are shortened in the middle; `--json` is not affected by the width."""
from __future__ import annotations

import json

import pytest
from rich.cells import cell_len

from sdtk.report.render import shorten_middle

WIDTHS = (80, 60)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("demo")
    out = {w: run_cli("demo", "--dir", folder / "files", env={"COLUMNS": str(w)}) for w in WIDTHS}
    return folder / "files", out


def too_wide(text: str, width: int):
    return [line for line in text.splitlines() if cell_len(line) > width]


@pytest.mark.parametrize("width", WIDTHS)
def test_demo_reports_fit(demo, width):
    _, out = demo
    proc = out[width]
    assert proc.returncode == 0, proc.stderr
    assert "Components" in proc.stdout and "What to do" in proc.stdout and "3 files" in proc.stdout
    assert too_wide(proc.stdout, width) == []


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("lang", ["en", "ja", "zh", "ru"])
def test_every_demo_file_in_every_language_fits(demo, cli, width, lang):
    folder, _ = demo
    for path in sorted(folder.iterdir()):
        proc = cli("inspect", "-v", "--lang", lang, path, env={"COLUMNS": str(width)})
        assert proc.returncode in (0, 1), proc.stderr
        assert too_wide(proc.stdout, width) == [], path.name


def test_component_labels_stay_whole_and_prefixes_shorten_in_the_middle(demo):
    _, out = demo
    lines = out[80].stdout.splitlines()
    start = lines.index("Components")
    rows = lines[start + 1:start + 6]
    assert [r.split("  ")[1] for r in rows][:3] == ["UNet", "EMA copy of the UNet", "VAE (sd-vae-kl-f8)"]
    assert any("model.d" in r and "…" in r and "_model." in r for r in rows)  # model.diffusion_model.
    narrow = out[60].stdout.splitlines()
    start = narrow.index("Components")
    assert narrow[start + 4].split("  ")[1] == "Text encoder 1 (clip-l)"  # never broken over two lines


def test_json_does_not_depend_on_the_width(demo, cli):
    folder, _ = demo
    docs = [json.loads(cli("inspect", "--json", folder, env={"COLUMNS": str(w)}).stdout) for w in (40, 200)]
    assert docs[0] == docs[1]


@pytest.mark.parametrize("value,width,expected", [
    ("model.diffusion_model.", 30, "model.diffusion_model."),
    ("model.diffusion_model.", 11, "model…odel."),
    ("model.diffusion_model.", 10, "model…del."),
    ("abc", 1, "…"),
])
def test_shorten_middle(value, width, expected):
    assert shorten_middle(value, width) == expected
    assert cell_len(shorten_middle(value, width)) <= width


def test_library_list_fits_by_leaving_columns_out(tmp_path, cli):
    """The library table keeps every cell on one line at 80 and 60 columns: the name is shortened
    in the middle and the least useful columns are left out; at 200 columns everything is shown."""
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.samples import layout_plan, load_layout

    folder = tmp_path / "models"
    folder.mkdir()
    long_name = "a-very-long-model-file-name-v2-final-pruned-ema-only-fp16-by-someone.safetensors"
    write_safetensors(folder / long_name, layout_plan(load_layout("sd15-emaonly"), scale=32))
    env = {"SDTK_LIBRARY_DB": str(tmp_path / "lib.sqlite3")}
    assert cli("library", "scan", "--no-content", folder, env=env).returncode == 0
    wide = cli("library", "list", env={**env, "COLUMNS": "200"}).stdout
    assert long_name in wide and "precision" in wide and "stable-diffusion-v1" in wide
    for width in WIDTHS:
        out = cli("library", "list", env={**env, "COLUMNS": str(width)}).stdout
        assert too_wide(out, width) == [] and "…" in out
        row = [line for line in out.splitlines() if line.startswith("a-very")]
        assert len(row) == 1 and "stable-diffusion-v1" in row[0]  # one line per file, architecture kept
