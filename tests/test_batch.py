"""`sdtk batch` with real parts on 127.0.0.1: an S3 API server (moto's server mode, started and
stopped by the tests) holding a few hundred objects of every kind, the local engine (process
pool), HTTP range reads, resumption, bad input. The Ray cluster tests are in test_batch_ray.py."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

import helpers_batch as H  # noqa: E402
from conftest import SRC, run_cli  # noqa: E402

from sdtk.batch import LocalEngine, run_batch  # noqa: E402
from sdtk.batch.listing import ObjectRef  # noqa: E402
from sdtk.batch.results import journal_path, read_results  # noqa: E402
from sdtk.batch.work import process_object  # noqa: E402
from sdtk.formats.source import LocalFileSource, RangeBuffer  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def s3_env():
    saved = {k: os.environ.get(k) for k in H.S3_ENV}
    os.environ.update(H.S3_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch-corpus")
    marker = base / "PAYLOAD-RAN"
    expect = H.build_corpus(base / "objects", marker)
    return base / "objects", expect, marker


@pytest.fixture(scope="module")
def s3(corpus, tmp_path_factory):
    root, expect, _ = corpus
    server = H.MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        assert server.upload(root) == len(expect)
        yield server
    finally:
        server.stop()


def cli(capsys, *args, env=None):
    """`sdtk ARGS` in this process (no interpreter start): (exit code, stdout, stderr)."""
    from sdtk.cli.main import main

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        from sdtk.batch import sources

        sources._clients.clear()  # credentials may differ in the next call
    out, err = capsys.readouterr()
    return code, out, err


def rows_of(path: Path):
    return read_results(path)


def key_of(url: str) -> str:
    return url.split(f"s3://{H.BUCKET}/", 1)[1]


# -- the byte source ---------------------------------------------------------------------------


def test_range_buffer_is_the_file(tmp):
    import random

    data = random.Random(1).randbytes(300_000)
    path = tmp / "blob"
    path.write_bytes(data)
    src = LocalFileSource(str(path))
    buf = RangeBuffer(src, readahead=8192)
    rnd = random.Random(2)
    for _ in range(300):
        a = rnd.randrange(0, len(data))
        b = a + rnd.randrange(0, 20_000)
        assert buf[a:b] == data[a:b]
        assert buf[a] == data[a]
    assert buf[-5:] == data[-5:] and len(buf) == len(data)
    needle = data[250_000:250_010]
    assert buf.find(needle, 1000) == data.find(needle, 1000)
    assert buf.find(b"\xff" * 64) == -1
    # wanted ranges (madvise, as zipread asks for local headers) are fetched together at the next miss
    fresh = RangeBuffer(LocalFileSource(str(path)), readahead=4096)
    import mmap

    for off in range(100_000, 200_000, 20_000):
        fresh.madvise(mmap.MADV_WILLNEED, off, 100)
    before = fresh.source.requests
    fresh[0:10]
    after = fresh.source.requests
    assert after - before == 2  # the miss, and the five wanted ranges in one request (20 KB apart: joined)
    for off in range(100_000, 200_000, 20_000):
        assert fresh[off:off + 100] == data[off:off + 100]
    assert fresh.source.requests == after  # no more requests: they were all fetched
    src.close()
    fresh.source.close()


# -- S3 + local engine ---------------------------------------------------------------------------


def test_scan_s3_every_object_once_hostile_unsafe_nothing_runs(s3, corpus, tmp):
    root, expect, marker = corpus
    out = tmp / "scan.jsonl"
    summary = run_batch("scan", [f"s3://{H.BUCKET}/"], out, LocalEngine(2), endpoint_url=s3.endpoint)
    rows = rows_of(out)
    assert summary.listed == len(expect) == len(rows) == summary.processed
    assert sorted(key_of(u) for u in rows) == sorted(expect)
    with open(out) as fh:
        assert len(fh.readlines()) == len(expect) + 1  # header + exactly one line per object
    got = {key_of(u): r["verdict"] for u, r in rows.items()}
    assert got == expect
    assert not marker.exists()
    assert all(r["error"] is None for r in rows.values())
    hostile = [r for k, r in rows.items() if "/hostile/" in k]
    assert len(hostile) == 48 and all("nothing was executed" in r["reason"] or "not allowed" in r["reason"] for r in hostile)
    # in place: the header only, never the data
    big = rows[f"s3://{H.BUCKET}/checkpoints/big-data.safetensors"]
    assert big["size"] > 32_000_000 and big["fetched_bytes"] <= 64 * 1024 and big["requests"] == 1
    ckpt = rows[f"s3://{H.BUCKET}/checkpoints/sd15-emaonly.ckpt"]
    assert ckpt["verdict"] == "safe" and ckpt["fetched_bytes"] < ckpt["size"] / 3
    assert summary.exit_code() == 1 and summary.verdicts == {"safe": 146, "unsafe": 48, "unreadable": 70}
    assert not journal_path(out).exists()
    # a rerun reads nothing
    again = run_batch("scan", [f"s3://{H.BUCKET}/"], out, LocalEngine(2), endpoint_url=s3.endpoint)
    assert (again.skipped, again.processed, again.fetched_bytes, again.requests) == (len(expect), 0, 0, 0)
    assert rows_of(out) == rows


def test_inspect_s3_parquet_same_identity_as_local_files(s3, corpus, tmp):
    from sdtk.errors import SdtkError
    from sdtk.formats import open_model
    from sdtk.library.describe import describe_for_library

    root, expect, _ = corpus
    out = tmp / "inspect.parquet"
    summary = run_batch("inspect", [f"s3://{H.BUCKET}/checkpoints/", f"s3://{H.BUCKET}/embeddings/",
                                    f"s3://{H.BUCKET}/hostile/"], out, LocalEngine(2), endpoint_url=s3.endpoint)
    rows = rows_of(out)
    assert len(rows) == summary.listed == sum(1 for k in expect if k.split("/")[0] in ("checkpoints", "embeddings", "hostile"))
    for url, row in rows.items():
        local = root / key_of(url)
        try:
            with open_model(local) as cat:
                desc = describe_for_library(cat)
        except SdtkError as e:
            assert row["verdict"] in ("unsafe", "unreadable") and row["reason"] == e.problem
            continue
        assert row["verdict"] == "safe"
        for col in ("format", "architecture", "kind", "precision", "tensor_count", "parameters", "title"):
            assert row[col] == desc[col], (url, col)
    big = rows[f"s3://{H.BUCKET}/checkpoints/big-data.safetensors"]
    assert big["fetched_bytes"] <= 64 * 1024
    archs = {row["architecture"] for row in rows.values()}
    assert {"stable-diffusion-v1", "stable-diffusion-xl-v1-base", "flux-1-dev", "stable-diffusion-v1/textual-inversion"} <= archs


def test_hash_s3_sqlite_equals_hashlib(s3, corpus, tmp):
    import blake3

    root, expect, _ = corpus
    out = tmp / "hash.sqlite"
    srcs = [f"s3://{H.BUCKET}/checkpoints/", f"s3://{H.BUCKET}/loras/lora_00", f"s3://{H.BUCKET}/truncated/"]
    summary = run_batch("hash", srcs, out, LocalEngine(2), endpoint_url=s3.endpoint)
    rows = rows_of(out)
    assert len(rows) == summary.listed and summary.exit_code() == 0
    for url, row in rows.items():
        data = (root / key_of(url)).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["blake3"] == blake3.blake3(data).hexdigest()
        assert row["crc32"] == (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little").hex()
        assert row["autov2"] == row["sha256"][:10]
        assert row["fetched_bytes"] == len(data) == row["size"] and row["requests"] == 1  # one streaming read


def test_http_list_file_range_requests(s3, corpus, tmp):
    root, expect, marker = corpus
    pub = "public-models"
    c = s3.client()
    c.create_bucket(Bucket=pub)
    keys = [k for k in sorted(expect) if k.startswith(("hostile/evil_00", "checkpoints/sd15", "checkpoints/big", "misc/file_00"))]
    for k in keys:
        c.put_object(Bucket=pub, Key=k, Body=(root / k).read_bytes(), ACL="public-read")
    listing = tmp / "urls.txt"
    listing.write_text("# objects on a web server\n" + "".join(f"{s3.endpoint}/{pub}/{k}\n" for k in keys))
    out = tmp / "http.jsonl"
    summary = run_batch("scan", [str(listing)], out, LocalEngine(2))
    rows = rows_of(out)
    assert len(rows) == len(keys) == summary.processed
    for url, row in rows.items():
        k = url.split(f"/{pub}/", 1)[1]
        assert row["verdict"] == expect[k], (url, row["error"], row["reason"])
    big = rows[f"{s3.endpoint}/{pub}/checkpoints/big-data.safetensors"]
    assert big["fetched_bytes"] <= 64 * 1024
    assert not marker.exists()


def test_changed_and_vanished_objects(s3, corpus, tmp):
    root, expect, _ = corpus
    c = s3.client()
    bucket = "churn"
    c.create_bucket(Bucket=bucket)
    names = ["loras/lora_000.safetensors", "loras/lora_001.safetensors", "embeddings/emb_000.pt"]
    for k in names:
        c.put_object(Bucket=bucket, Key=k, Body=(root / k).read_bytes())
    out = tmp / "churn.jsonl"
    first = run_batch("hash", [f"s3://{bucket}/"], out, LocalEngine(1), endpoint_url=s3.endpoint)
    assert first.processed == 3
    # listed, then replaced or deleted before it is read: a row with the error, no hashes
    head = c.head_object(Bucket=bucket, Key=names[0])
    ref = ObjectRef(f"s3://{bucket}/{names[0]}", head["ContentLength"], head["ETag"].strip('"'), None)
    c.put_object(Bucket=bucket, Key=names[0], Body=b"x" * head["ContentLength"])
    row = process_object("hash", ref, {"endpoint_url": s3.endpoint})
    assert row["error_kind"] == "changed" and row["sha256"] is None and "changed" in row["error"]
    gone = ObjectRef(f"s3://{bucket}/{names[1]}", 964, "0" * 32, None)
    c.delete_object(Bucket=bucket, Key=names[1])
    row = process_object("scan", gone, {"endpoint_url": s3.endpoint})
    assert row["error_kind"] == "vanished" and row["verdict"] is None
    # the rerun reads just the changed object; the deleted one keeps its old row (or goes with --prune)
    again = run_batch("hash", [f"s3://{bucket}/"], out, LocalEngine(1), endpoint_url=s3.endpoint)
    assert (again.listed, again.processed) == (2, 1)
    rows = rows_of(out)
    assert len(rows) == 3 and rows[ref.url]["sha256"] == hashlib.sha256(b"x" * head["ContentLength"]).hexdigest()
    pruned = run_batch("hash", [f"s3://{bucket}/"], out, LocalEngine(1), endpoint_url=s3.endpoint, prune=True)
    assert pruned.processed == 0 and len(rows_of(out)) == 2


def _children(pid: int):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _journal_rows(out: Path) -> int:
    j = journal_path(out)
    return max(0, len(j.read_text().splitlines()) - 1) if j.exists() else 0


def test_worker_killed_and_driver_killed_resume_exactly_once(s3, corpus, tmp):
    """A pool worker killed mid-run: its objects are retried. The driver killed mid-run: the next
    run continues from the journal. Either way every object ends with exactly one row."""
    root, expect, marker = corpus
    out = tmp / "resume.jsonl"
    cmd = [sys.executable, "-m", "sdtk", "batch", "scan", f"s3://{H.BUCKET}/", "--out", str(out), "-j", "2", "--chunk", "1",
           "--s3-endpoint-url", s3.endpoint, "--json"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _journal_rows(out) < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers = _children(proc.pid)
        killed_worker = None
        for pid in workers:  # a worker of the pool (forked children of the driver)
            try:
                os.kill(pid, signal.SIGKILL)
                killed_worker = pid
                break
            except OSError:
                pass
        while _journal_rows(out) < 60 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        done_before = _journal_rows(out)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool, mid-run
        proc.wait(timeout=30)
    finally:
        H.stop_session(proc)
    assert killed_worker is not None
    assert not out.exists() and journal_path(out).exists()  # no results file yet: the journal has the rows
    summary = run_batch("scan", [f"s3://{H.BUCKET}/"], out, LocalEngine(2), endpoint_url=s3.endpoint)
    assert summary.skipped >= done_before - 2 and summary.processed == len(expect) - summary.skipped
    rows = rows_of(out)
    assert sorted(key_of(u) for u in rows) == sorted(expect)
    assert {key_of(u): r["verdict"] for u, r in rows.items()} == expect
    with open(out) as fh:
        assert len(fh.readlines()) == len(expect) + 1
    assert not journal_path(out).exists() and not marker.exists()


def test_bad_input_one_line_errors(s3, tmp, capsys):
    dead = f"http://127.0.0.1:{H.free_port()}"
    res = run_cli("batch", "scan", f"s3://{H.BUCKET}/", "--out", tmp / "x.jsonl", "--s3-endpoint-url", dead)
    assert res.returncode == 2 and "cannot reach" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp / "x.jsonl").exists()
    # a results file of another version, of another command, or not a results file: refused, untouched
    other = tmp / "old.jsonl"
    other.write_text('{"sdtk_batch_results": 99, "command": "scan"}\n{"url": "s3://a/b"}\n')
    code, out, err = cli(capsys, "batch", "scan", f"s3://{H.BUCKET}/misc/", "--out", other, "--s3-endpoint-url", s3.endpoint)
    assert code == 2 and "another sdtk version" in err and len(err.strip().splitlines()) == 1
    assert other.read_text().startswith('{"sdtk_batch_results": 99')
    hashes = tmp / "h.jsonl"
    assert cli(capsys, "batch", "hash", f"s3://{H.BUCKET}/misc/file_000", "--out", hashes, "--s3-endpoint-url", s3.endpoint)[0] == 0
    code, out, err = cli(capsys, "batch", "scan", f"s3://{H.BUCKET}/misc/", "--out", hashes, "--s3-endpoint-url", s3.endpoint)
    assert code == 2 and "holds `sdtk batch hash` results" in err
    junk = tmp / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    code, out, err = cli(capsys, "batch", "scan", f"s3://{H.BUCKET}/misc/", "--out", junk, "--s3-endpoint-url", s3.endpoint)
    assert code == 2 and "not a readable sdtk batch results file" in err and junk.read_bytes() == b"not parquet at all"
    code, out, err = cli(capsys, "batch", "scan", f"s3://{H.BUCKET}/misc/", "--out", tmp / "r.csv")
    assert code == 2 and ".jsonl" in err
    # a bucket of non-model files: one row each, "not a model file", exit 1
    code, out, err = cli(capsys, "batch", "inspect", f"s3://{H.BUCKET}/misc/", "--out", tmp / "misc.jsonl",
                         "--s3-endpoint-url", s3.endpoint, "--json", "-j", "1")
    summary = json.loads(out)
    assert code == 1 and summary["verdicts"] == {"unreadable": 30}
    assert all("not a model file" in r["reason"] for r in rows_of(tmp / "misc.jsonl").values())
    code, out, err = cli(capsys, "batch", "scan", "s3://no-such-bucket/", "--out", tmp / "nb.jsonl", "--s3-endpoint-url", s3.endpoint)
    assert code == 2 and "no such bucket" in err.lower()
    # wrong credentials: a server that authenticates every request
    server = H.MotoServer(tmp / "moto-auth.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        code, out, err = cli(capsys, "batch", "scan", f"s3://{H.BUCKET}/", "--out", tmp / "y.jsonl", "--s3-endpoint-url",
                             server.endpoint, env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "wrong"})
    finally:
        server.stop()
    assert code == 2 and "refused the credentials" in err and len(err.strip().splitlines()) == 1


def test_library_import(s3, corpus, tmp):
    from sdtk.batch.importer import import_results
    from sdtk.hashing.cache import cached_file_hashes
    from sdtk.hashing.filehash import hash_file
    from sdtk.library import connect
    from sdtk.library.query import find_hash

    root, expect, _ = corpus
    inspect_out, hash_out, local_out = tmp / "i.jsonl", tmp / "h.parquet", tmp / "l.sqlite"
    run_batch("inspect", [f"s3://{H.BUCKET}/loras/", f"s3://{H.BUCKET}/hostile/"], inspect_out, LocalEngine(1), endpoint_url=s3.endpoint)
    run_batch("hash", [f"s3://{H.BUCKET}/loras/"], hash_out, LocalEngine(1), endpoint_url=s3.endpoint)
    local = tmp / "local"
    local.mkdir()
    for k in ("loras/lora_010.safetensors", "embeddings/emb_003.pt"):
        (local / Path(k).name).write_bytes((root / k).read_bytes())
    run_batch("hash", [str(local)], local_out, LocalEngine(1))
    conn = connect(tmp / "lib.sqlite")
    try:
        a = import_results(conn, inspect_out)
        b = import_results(conn, hash_out)
        c = import_results(conn, local_out)
        assert (a.new, b.updated, c.new, c.hash_cache) == (128, 80, 2, 2)
        sha = hashlib.sha256((root / "loras/lora_005.safetensors").read_bytes()).hexdigest()
        found = find_hash(conn, sha[:10])
        assert found and found[0]["matched"] == ["AutoV2"]
        assert [f["record"]["path"] for f in found] == [f"s3://{H.BUCKET}/loras/lora_005.safetensors"]
        rec = found[0]["record"]
        assert (rec["kind"], rec["architecture"], rec["sha256"]) == ("lora", "stable-diffusion-xl-v1-base/lora", sha)
        evil = conn.execute("SELECT problem FROM files WHERE path LIKE '%hostile/evil_001.pkl'").fetchone()
        assert "not allowed" in evil["problem"]
    finally:
        conn.close()
    for f in local.iterdir():  # the hash cache knows the local files: the same values hash_file computes
        assert cached_file_hashes(f) == hash_file(f)
