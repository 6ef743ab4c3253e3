"""sdtk serve's guards over HTTP: Host allowlist, Origin/CSRF on every state-changing request and
event stream, no state-changing GET, paths only by id and only inside a root (../, absolute,
encoded traversal, symlinks out), sniffed previews, the hostile file shown unsafe and never run,
the token, vendored assets as recorded."""
import hashlib
import os
import socket
from pathlib import Path

import pytest

from helpers_webapp import HX, ORIGIN, PORT, build, client_for, file_id, wait_job, last_job
from sdtk.errors import SdtkError, UsageError

ALL_GETS = ["/", "/library/rows", "/model/1", "/preview/1/0", "/convert?file=1", "/merge?a=1", "/jobs", "/jobs/1",
            "/dupes", "/merge/recipe.yaml", "/static/app.js", "/events/jobs"]
POSTS = ["/run/convert", "/run/merge", "/run/scan", "/run/hash", "/run/index", "/jobs/1/cancel", "/merge/preview",
         "/dupes/remove", "/dupes/undo"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    base = tmp_path_factory.mktemp("websec")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"secret")
    sample = build(base)
    # a symlink inside the root to a model outside it, and a preview symlinked out of the root
    import shutil
    shutil.copy(sample["vae"], outside / "elsewhere.safetensors")
    (sample["root"] / "vae" / "linked.safetensors").symlink_to(outside / "elsewhere.safetensors")
    (sample["root"] / "loras" / "inkwash.png").symlink_to(outside / "secret.png")
    from sdtk.library import open_library, scan_library
    conn = open_library(base / "lib.db")
    scan_library(conn, [str(sample["root"])])
    # a record pointing outside every root (a library shared with other folders, or tampered with)
    conn.execute("INSERT INTO files (path, root, size, mtime_ns, inode, device, status, first_seen, last_seen, info) "
                 "VALUES (?, ?, 5, 0, 0, 0, 'present', 0, 0, ?)",
                 ("/etc/passwd", "/etc", '{"sidecars": {"files": {"preview": ["../../etc/hostname"]}}}'))
    conn.close()
    with client_for(base, sample) as client:
        client.sample, client.base, client.outside = sample, base, outside
        yield client


def test_host_header_allowlist_refuses_rebinding(lib):
    for path in ALL_GETS:
        r = lib.get(path, headers={"Host": "evil.example"})
        assert r.status_code == 421, path
        r = lib.get(path, headers={"Host": f"evil.example:{PORT}"})
        assert r.status_code == 421, path
    assert lib.post("/run/index", headers={**HX, "Host": "evil.example"}).status_code == 421
    assert lib.get("/", headers={"Host": f"localhost:{PORT}"}).status_code == 200


@pytest.mark.parametrize("path", POSTS)
def test_cross_origin_and_forged_posts_refused(lib, path):
    before = len(lib.web.queue.jobs())
    for headers in ({"Origin": "http://evil.example", "HX-Request": "true"},
                    {"Origin": "null", "HX-Request": "true"},
                    {"Origin": f"http://127.0.0.1:{PORT + 1}", "HX-Request": "true"},
                    {"HX-Request": "true"},  # no Origin and no Sec-Fetch-Site: not a same-origin browser request
                    {"HX-Request": "true", "Sec-Fetch-Site": "cross-site"},
                    {"Origin": ORIGIN}):  # a plain cross-site <form> cannot add HX-Request
        r = lib.post(path, data={"file": "1", "batch": "x"}, headers=headers)
        assert r.status_code == 403, (path, headers)
        assert "refused" in r.text
    assert len(lib.web.queue.jobs()) == before


def test_same_origin_post_accepted_without_origin_header(lib):
    r = lib.post("/run/scan", data={"file": str(file_id(lib, lib.sample["vae"]))},
                 headers={"Sec-Fetch-Site": "same-origin", "HX-Request": "true"})
    assert r.status_code == 200 and "queued" in r.text
    assert wait_job(lib, last_job(lib).id).state == "done"


def test_event_stream_checks_origin(lib):
    assert lib.get("/events/jobs", headers={"Origin": "http://evil.example"}).status_code == 403
    assert lib.get("/events/jobs", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert lib.get("/events/jobs", headers={"Sec-Fetch-Site": "same-site"}).status_code == 403


def test_no_state_changing_get(lib):
    before = len(lib.web.queue.jobs())
    for path in POSTS:
        assert lib.get(path + "?file=1&batch=x").status_code in (404, 405), path
    assert len(lib.web.queue.jobs()) == before


def test_security_headers_everywhere(lib):
    for path in ["/", "/static/app.js", "/model/999999", "/preview/1/0"]:
        r = lib.get(path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    r = lib.get("/", headers={"Host": "evil.example"})
    assert r.headers["x-content-type-options"] == "nosniff"


TRAVERSALS = ["../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
              "%2fetc%2fpasswd", "....//....//etc/passwd", "..\\..\\etc\\passwd", "%252e%252e%252fetc%252fpasswd",
              "%00", "1%00/etc/passwd", "1/../../etc/passwd"]


def test_traversal_in_urls_never_reaches_a_file(lib):
    for t in TRAVERSALS:
        for prefix in ("/model/", "/preview/", "/preview/1/", "/static/", "/static/vendor/", "/jobs/"):
            r = lib.get(prefix + t)
            assert r.status_code in (400, 404, 405), (prefix, t)
            assert "root:" not in r.text, (prefix, t)
    for q in ("/convert?file=", "/merge?a="):
        for t in TRAVERSALS:
            r = lib.get(q + t)
            assert r.status_code == 404 and "root:" not in r.text, (q, t)


def test_traversal_in_forms_refused(lib):
    vae = str(file_id(lib, lib.sample["vae"]))
    sd_a, sd_b = str(file_id(lib, lib.sample["sd_a"])), str(file_id(lib, lib.sample["sd_b"]))
    before = len(lib.web.queue.jobs())
    for t in TRAVERSALS + ["1\x00", str(lib.outside / "elsewhere.safetensors")]:
        for path, data in (("/run/convert", {"file": t}), ("/run/hash", {"file": t}), ("/run/scan", {"file": t}),
                           ("/run/convert", {"file": vae, "bake_vae": t}), ("/run/merge", {"model_a": t, "model_b": sd_b, "output": "m.safetensors"}),
                           ("/dupes/remove", {"file": t}), ("/merge/preview", {"model_a": sd_a, "model_b": t})):
            r = lib.post(path, data=data, headers=HX)
            assert r.status_code == 200 and 'class="msg error"' in r.text, (path, data)
    for name in ("../x.safetensors", "/tmp/x.safetensors", "..%2fx.safetensors", "a/b.safetensors", "a\\b.safetensors",
                 ".hidden.safetensors", "x.ckpt", "C:x.safetensors", "x\x00.safetensors"):
        for path, data in (("/run/convert", {"file": vae, "output": name}),
                           ("/run/merge", {"model_a": sd_a, "model_b": sd_b, "output": name})):
            r = lib.post(path, data=data, headers=HX)
            assert 'class="msg error"' in r.text, (path, name)
    assert len(lib.web.queue.jobs()) == before


def test_ids_outside_the_roots_refused_on_every_route(lib):
    outside_id = file_id(lib, "/etc/passwd")
    linked_id = lib.web.conn.execute("SELECT id FROM files WHERE path LIKE '%linked.safetensors'").fetchone()["id"]
    for fid in (outside_id, linked_id):  # a record outside, and a symlink in the root pointing out of it
        assert lib.get(f"/model/{fid}").status_code == 404
        assert lib.get(f"/preview/{fid}/0").status_code == 404
        assert lib.get(f"/convert?file={fid}").status_code == 404
        assert lib.get(f"/merge?a={fid}").status_code == 404
        for path, data in (("/run/convert", {"file": fid}), ("/run/hash", {"file": fid}), ("/run/scan", {"file": fid}),
                           ("/dupes/remove", {"file": fid})):
            r = lib.post(path, data=data, headers=HX)
            assert "outside the folders" in r.text, (path, fid)
    assert "root:" not in lib.get("/").text and "passwd" not in lib.get("/").text


def test_previews_are_sniffed_and_contained(lib):
    ink = file_id(lib, lib.sample["lora"])
    row = lib.web.conn.execute("SELECT info FROM files WHERE id = ?", (ink,)).fetchone()
    names = __import__("json").loads(row["info"])["sidecars"]["files"]["preview"]
    real = names.index("inkwash.preview.png")
    r = lib.get(f"/preview/{ink}/{real}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    assert r.headers["x-content-type-options"] == "nosniff"
    linked = names.index("inkwash.png")  # a symlink to an image outside the root
    assert lib.get(f"/preview/{ink}/{linked}").status_code == 404
    sneaky = file_id(lib, lib.sample["sneaky"])  # HTML named .preview.png
    r = lib.get(f"/preview/{sneaky}/0")
    assert r.status_code == 404 and "<script>" not in r.text
    assert lib.get(f"/preview/{ink}/99").status_code == 404


def test_hostile_file_shown_unsafe_and_never_executed(lib):
    marker = lib.sample["marker"]
    hostile = file_id(lib, lib.sample["hostile"])
    page = lib.get(f"/model/{hostile}").text
    assert "Unsafe file" in page and "os.system" in page and "nothing was executed" in page
    assert "Convert for generation" not in page and "/convert?file=" not in page
    rows = lib.get("/library/rows?q=free-model").text
    assert "unreadable or unsafe" in rows
    r = lib.post("/run/scan", data={"file": hostile}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.result["verdict"] == "unsafe"
    r = lib.post("/run/convert", data={"file": hostile}, headers=HX)
    if "queued" in r.text:
        job = wait_job(lib, last_job(lib).id)
        assert job.state == "failed" and "not allowed" in job.error
    assert not marker.exists()
    assert not [p for p in lib.sample["hostile"].parent.iterdir() if p.name.startswith("free-model") and p.suffix != ".ckpt"]


def test_vendored_assets_match_their_record():
    from importlib import resources

    vendor = resources.files("sdtk.web").joinpath("static", "vendor")
    rows = [ln.split() for ln in vendor.joinpath("VENDOR.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert {r[0] for r in rows} == {"htmx-2.0.11.min.js", "htmx-ext-sse-2.2.4.min.js"}
    for r in rows:
        assert hashlib.sha256(vendor.joinpath(r[0]).read_bytes()).hexdigest() == r[-1], r[0]
    for lic in ("LICENSE.htmx", "LICENSE.htmx-ext-sse"):
        assert "Permission to use, copy, modify" in vendor.joinpath(lic).read_text()


def test_pages_load_nothing_from_elsewhere(lib):
    import re
    for path in ("/", f"/model/{file_id(lib, lib.sample['demo_ckpt'])}", "/jobs", "/dupes"):
        html = lib.get(path).text
        for url in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert not re.match(r"^(https?:)?//", url), (path, url)


def test_listen_beyond_loopback_needs_a_token():
    from sdtk.web.settings import check_listen
    with pytest.raises(UsageError, match="--token"):
        check_listen("0.0.0.0", None)
    with pytest.raises(UsageError, match="16"):
        check_listen("0.0.0.0", "short")
    assert check_listen("127.0.0.1", None) == ("127.0.0.1", None)


def test_token_guards_every_request(tmp_path):
    from starlette.testclient import TestClient
    from sdtk.web.app import create_app
    from sdtk.web.settings import ServeSettings

    token = "t0ken-t0ken-t0ken-t0ken"
    (tmp_path / "m").mkdir()
    s = ServeSettings(db=tmp_path / "lib.db", roots=[str(tmp_path / "m")], host="192.0.2.10", port=PORT, token=token,
                      state_dir=tmp_path / "state")
    app = create_app(s)
    try:
        with TestClient(app, base_url=f"http://192.0.2.10:{PORT}") as c:
            assert c.get("/").status_code == 401
            assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            r = c.get(f"/?token={token}", follow_redirects=False)
            assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
            assert c.get("/", headers={"Cookie": f"sdtk_token={token}"}).status_code == 200
            assert c.get("/", headers={"Host": "evil.example", "Cookie": f"sdtk_token={token}"}).status_code == 421
            r = c.post("/dupes/remove", data={"file": "1"}, headers={"Cookie": f"sdtk_token={token}", "HX-Request": "true",
                                                                     "Origin": f"http://192.0.2.10:{PORT}"})
            assert r.status_code == 200 and "disabled while the server listens beyond this computer" in r.text
    finally:
        app.app.state.web.queue.stop()


def test_port_in_use_is_a_clear_message():
    from sdtk.web.server import bind
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(SdtkError, match="in use"):
            bind("127.0.0.1", s.getsockname()[1])
    finally:
        s.close()


def test_root_that_is_not_a_folder_refused(tmp_path):
    from sdtk.web.settings import real_root
    (tmp_path / "file").write_text("x")
    with pytest.raises(SdtkError, match="not a folder"):
        real_root(tmp_path / "file")
    with pytest.raises(SdtkError, match="no such folder"):
        real_root(tmp_path / "nope")
