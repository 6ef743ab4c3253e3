"""`sdtk serve` bullets of issue 14 no other test file covers: the roots default to the library's
folders (new ones indexed in the background), the browser opened unless --no-browser, the sidecars
of other managers (Stability Matrix, Lora-Manager) in the library and on the model page, and a
failed job's message both in the page and in the job log."""
import html
import json
import os
import socket
import time

import pytest
from typer.testing import CliRunner

from helpers_webapp import HX, build, client_for, file_id, last_job, wait_job


@pytest.fixture
def captured(monkeypatch):
    """`sdtk serve` run in-process up to the point where it would start serving."""
    import sdtk.web.server as server

    seen = {}

    def fake_serve(settings, sock, open_browser=True, announce=None):
        seen.update(settings=settings, open_browser=open_browser)
        sock.close()

    monkeypatch.setattr(server, "serve", fake_serve)
    return seen


def run_serve(*args):
    from sdtk.cli.main import app

    return CliRunner().invoke(app, ["serve", "--port", "0", *map(str, args)])


def test_roots_default_to_the_library_folders_and_the_browser_opens(tmp_path, captured):
    sample = build(tmp_path)  # the library has scanned models/
    r = run_serve("--db", tmp_path / "lib.db")
    assert r.exit_code == 0, r.output
    s = captured["settings"]
    assert s.roots == [os.path.realpath(sample["root"])] and s.index_roots == []  # known: not indexed again
    assert captured["open_browser"] is True and s.removal == "trash" and s.local_only
    other = tmp_path / "more"
    other.mkdir()
    r = run_serve("--db", tmp_path / "lib.db", "--root", other, "--no-browser", "--remove-to", "quarantine")
    assert r.exit_code == 0, r.output
    s = captured["settings"]
    assert s.roots == [os.path.realpath(other)] and s.index_roots == [os.path.realpath(other)]  # new: background index
    assert captured["open_browser"] is False and s.removal == "quarantine"


def test_no_folder_to_serve_is_a_message(tmp_path):
    from conftest import run_cli

    r = run_cli("serve", "--db", tmp_path / "empty.db", "--port", "0", "--no-browser")
    assert r.returncode == 2 and "no model folders to serve" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve", "--db", tmp_path / "empty.db", "--root", tmp_path, "--port", "0", "--no-browser", "--remove-to", "bin")
    assert r.returncode == 2 and "choose trash or quarantine" in r.stderr


def test_serve_opens_the_browser_on_its_address_unless_told_not(tmp_path, monkeypatch):
    import uvicorn
    import webbrowser

    from sdtk.web.server import bind, serve
    from sdtk.web.settings import ServeSettings

    sample = build(tmp_path)
    opened, ran = [], []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(sockets))
    for open_browser in (True, False):
        sock = bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        settings = ServeSettings(db=tmp_path / "lib.db", roots=[os.path.realpath(sample["root"])], port=port,
                                 state_dir=tmp_path / "state")
        try:
            serve(settings, sock, open_browser=open_browser)
        finally:
            sock.close()
        time.sleep(1.5)  # the browser is opened 0.8 s after the server starts
        assert opened == ([f"http://127.0.0.1:{port}/"] if open_browser else []), opened
        opened.clear()
    assert len(ran) == 2 and all(isinstance(s[0], socket.socket) for s in ran)


def test_other_managers_sidecars_in_the_library_and_model_page(tmp_path):
    sample = build(tmp_path)
    b, g = sample["sd_b"], sample["sd_fp32"]
    (b.parent / (b.stem + ".cm-info.json")).write_text(json.dumps(  # Stability Matrix
        {"ModelId": 5, "VersionId": 6, "ModelName": "Beta From SM", "BaseModel": "SD 1.5", "TrainedWords": ["betaword"]}))
    (g.parent / (g.stem + ".metadata.json")).write_text(json.dumps(  # ComfyUI-Lora-Manager
        {"model_name": "Gamma From LM", "base_model": "SD 1.5 LCM"}))
    with client_for(tmp_path, sample) as lib:
        lib.post("/run/index", headers=HX)
        assert wait_job(lib, last_job(lib).id).state == "done"
        page = html.unescape(lib.get("/?q=betaword").text)
        assert "beta-mix.safetensors" in page and "betaword" in page and "alpha-mix" not in page
        assert "SD 1.5 LCM" in html.unescape(lib.get("/?q=gamma").text)
        model = html.unescape(lib.get(f"/model/{file_id(lib, b)}").text)
        assert "betaword" in model and "Base model:</strong> SD 1.5" in model and "Stability Matrix:</strong> Beta From SM" in model
        model = html.unescape(lib.get(f"/model/{file_id(lib, g)}").text)
        assert "Lora-Manager:</strong> Gamma From LM (SD 1.5 LCM)" in model


def test_a_failed_job_is_said_in_the_page_and_in_the_job_log(tmp_path):
    sample = build(tmp_path)
    with client_for(tmp_path, sample) as lib:
        vae = sample["vae"]
        fid = file_id(lib, vae)
        with open(vae, "ab") as f:
            f.write(b"\0" * 8)  # changed after it was indexed
        lib.post("/run/convert", data={"file": fid, "dtype": "fp16", "output": "x.safetensors"}, headers=HX)
        job = wait_job(lib, last_job(lib).id)
        assert job.state == "failed" and "changed since it was indexed" in job.error
        assert "changed since it was indexed" in html.unescape(lib.get(f"/jobs/{job.id}").text)
        assert not (vae.parent / "x.safetensors").exists()
        lines = [json.loads(line) for line in (tmp_path / "state" / "jobs.log").read_text().splitlines()]
        mine = [e for e in lines if e["id"] == job.id]
        assert mine and mine[-1]["state"] == "failed" and "changed since it was indexed" in mine[-1]["error"]
        assert lib.get("/").status_code == 200  # the server keeps running


def test_two_tabs_removing_both_copies_keep_one(tmp_path):
    """Two tabs show the same duplicate group; each removes a different copy. The second removal
    is refused (no other copy is left), in the page; the model stays in place."""
    import shutil

    sample = build(tmp_path)
    with client_for(tmp_path, sample, removal="quarantine") as lib:
        b = sample["sd_b"]
        copy = b.parent / "beta-copy.safetensors"
        shutil.copy2(b, copy)
        lib.post("/run/index", headers=HX)
        assert wait_job(lib, last_job(lib).id).state == "done"
        keep, gone = file_id(lib, copy), file_id(lib, b)  # the group lists beta-copy first: beta-mix has the button
        assert f'name="file" value="{gone}"' in lib.get("/dupes").text  # both tabs loaded this page
        assert "moved 1 file(s)" in lib.post("/dupes/remove", data={"file": gone}, headers=HX).text
        # the other tab (or a same-weights group, where every file has the button) removes the other copy
        r = html.unescape(lib.post("/dupes/remove", data={"file": keep}, headers=HX).text)
        assert 'class="msg error"' in r and "no other copy of it is left" in r and "nothing was moved" in r
        assert copy.is_file() and not b.exists()
        r = html.unescape(lib.post("/dupes/remove", data={"file": gone}, headers=HX).text)  # the first tab again
        assert 'class="msg error"' in r and "is no longer there" in r
        assert lib.get("/").status_code == 200


def test_pip_install_brings_every_template_and_asset():
    """Every file the app serves or renders is in the wheel (pyproject package-data): no Node
    build, nothing fetched at run time."""
    import fnmatch
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sdtk.web"]
    web = repo / "src" / "sdtk" / "web"
    files = [p.relative_to(web).as_posix() for d in ("templates", "static") for p in (web / d).rglob("*") if p.is_file()]
    assert any(f.endswith(".html") for f in files) and any("vendor/htmx" in f for f in files)
    missing = [f for f in files if not any(fnmatch.fnmatchcase(f, g) for g in globs)]
    assert not missing, missing


def test_model_page_metadata_hashes_and_duplicates(tmp_path):
    """The model page's header metadata (ModelSpec, kohya `ss_*`), hashes with copy buttons, and
    the other files with the same bytes (linked)."""
    import shutil

    sample = build(tmp_path)
    b = sample["sd_b"]
    shutil.copy2(b, b.parent / "beta-copy.safetensors")
    with client_for(tmp_path, sample) as lib:
        lib.post("/run/index", headers=HX)
        assert wait_job(lib, last_job(lib).id).state == "done"
        ink = html.unescape(lib.get(f"/model/{file_id(lib, sample['lora'])}").text)
        assert "<code>ss_base_model_version</code></th><td>sdxl_base_v1-0" in ink
        assert "<code>modelspec.trigger_phrase</code></th><td>inkwash style" in ink
        alpha = html.unescape(lib.get(f"/model/{file_id(lib, sample['sd_a'])}").text)
        assert "<code>modelspec.title</code></th><td>Alpha Mix" in alpha
        row = lib.web.conn.execute("SELECT sha256 FROM files WHERE id = ?", (file_id(lib, sample["sd_a"]),)).fetchone()
        assert row["sha256"].upper() in alpha and 'aria-label="Copy SHA256"' in alpha
        beta = html.unescape(lib.get(f"/model/{file_id(lib, b)}").text)
        dupes = beta[beta.index('id="dupes-title"'):]
        assert f'href="/model/{file_id(lib, b.parent / "beta-copy.safetensors")}">beta-copy.safetensors' in dupes
        assert "alpha-mix" not in dupes[:dupes.index("</section>")]
