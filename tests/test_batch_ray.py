"""`sdtk batch` on a real Ray cluster: a head and one more worker node (`ray start`), moto's S3
server, all inside a network namespace whose only interface is loopback (`unshare -n`), so
nothing can leave the machine and no port clashes with anything else. The worker node is killed
mid-run; every object must still be reported exactly once. See batch_cluster_driver.py."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("boto3")
pytest.importorskip("moto")

import helpers_batch as H  # noqa: E402

pytestmark = pytest.mark.timeout(600)
HERE = Path(__file__).resolve().parent


def _netns_or_skip():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a loopback-only network namespace")
    res = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot make a network namespace here (unshare -n: {res.stderr.strip()[:120]}); CI runs as root")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    _netns_or_skip()
    base = tmp_path_factory.mktemp("batch-ray")
    marker = base / "PAYLOAD-RAN"
    expect = H.build_corpus(base / "objects", marker)
    report = base / "report.json"
    inner = f"ip link set lo up && exec {sys.executable} {HERE / 'batch_cluster_driver.py'} " \
            f"--corpus {base / 'objects'} --work {base / 'work'} --report {report}"
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", inner], start_new_session=True)
    try:
        proc.wait(timeout=540)  # about 1 minute on an idle 2-core machine; 5 on a heavily loaded one
    except subprocess.TimeoutExpired:
        proc.terminate()  # the driver stops moto and the Ray nodes (each in its own session) by pid
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        H.stop_session(proc, timeout=10)
        pytest.fail("the cluster run took over 9 minutes (a heavily loaded machine?)")
    finally:
        H.stop_session(proc, timeout=5)
    data = json.loads(report.read_text())
    return base, expect, marker, data


def _rows(path: Path):
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["sdtk_batch_results"] == 1
    return [json.loads(line) for line in lines[1:]]


def test_scan_with_a_worker_node_killed_reports_every_object_once(cluster_run):
    base, expect, marker, data = cluster_run
    assert "error" not in data, data
    assert data["left_running"] == 0
    scan = data["scan"]
    assert scan["killed"] is not None, "the worker node was not killed while the run went on"
    assert scan["killed"]["rows_before"] < len(expect)
    assert len(scan["killed"]["rows_by_node_before"]) == 2  # both nodes had done work
    rows = _rows(base / "work" / "scan.jsonl")
    urls = [r["url"] for r in rows]
    assert len(urls) == len(set(urls)) == len(expect) == data["objects"]
    got = {r["url"].split(f"s3://{H.BUCKET}/", 1)[1]: r["verdict"] for r in rows}
    assert got == expect  # hostile ones unsafe, truncated and non-model unreadable, the rest safe
    assert all(r["error"] is None for r in rows)
    assert not marker.exists()
    assert scan["exit"] == 1 and scan["summary"]["processed"] == len(expect)
    assert scan["summary"]["engine"]["engine"] == "ray" and scan["summary"]["engine"]["nodes"] == 2
    by_node = scan["rows_by_node"]  # the killed node's finished rows are kept; the rest moved to the head
    assert len(by_node) == 2 and sum(by_node.values()) == len(expect)


def test_hash_on_the_cluster_equals_hashlib(cluster_run):
    base, expect, _, data = cluster_run
    assert data["hash"]["exit"] == 0, data["hash"]["stderr"]
    rows = _rows(base / "work" / "hash.jsonl")
    assert len(rows) == len(expect)
    for r in rows:
        body = (base / "objects" / r["url"].split(f"s3://{H.BUCKET}/", 1)[1]).read_bytes()
        assert r["sha256"] == hashlib.sha256(body).hexdigest() and r["fetched_bytes"] == len(body)
        assert r["worker"].startswith("ray-node:")


def test_rerun_reads_nothing(cluster_run):
    base, expect, _, data = cluster_run
    s = data["rescan"]["summary"]
    assert data["rescan"]["exit"] == 1, data["rescan"]["stderr"]
    assert (s["listed"], s["skipped"], s["processed"], s["fetched_bytes"], s["requests"]) == (len(expect), len(expect), 0, 0, 0)
    assert s["verdicts"] == data["scan"]["summary"]["verdicts"]
    assert len(_rows(base / "work" / "scan.jsonl")) == len(expect)
