"""Run inside a network namespace whose only interface is loopback (test_batch_ray.py starts it as
`unshare -n sh -c 'ip link set lo up && exec python batch_cluster_driver.py ...'`):

1. moto's S3 server on 127.0.0.1, the corpus uploaded to it;
2. a Ray cluster: a head node and one more worker node (`ray start ... --block`, each in its own
   session so it can be stopped by its process ids);
3. `sdtk batch scan s3://... --engine ray --ray-address ...`; once rows of both nodes came back,
   the worker node is killed (SIGKILL to every process of its session) while tasks run on it;
4. `sdtk batch hash` on what is left of the cluster, then the scan again (it must read nothing);
5. everything stopped by process id; a JSON report for the test.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
sys.path.insert(0, str(HERE))
sys.path.insert(0, SRC)

import helpers_batch as H  # noqa: E402


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float, also=None) -> None:
    """Until `text` is in `log`; fails when `proc` (or `also`, e.g. the head) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        for p in (proc, also):
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{log.name}: a Ray process ended (exit {p.returncode})")
        time.sleep(0.2)
    raise RuntimeError(f"{log.name}: no {text!r} after {timeout} s")


def journal_rows(out: Path):
    j = out.with_name(f".{out.name}.sdtk-journal")
    if not j.exists():
        return []
    rows = []
    for line in j.read_text().splitlines()[1:]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def parse(out, where: str):
    text = out.decode() if isinstance(out, bytes) else out
    try:
        return json.loads(text)
    except ValueError:
        raise RuntimeError(f"{where}: stdout is not a JSON summary: {text[-1500:]!r}") from None


def node_of(row) -> str:
    return (row.get("worker") or "").split("/")[0]


def _terminated(signum, frame):
    raise SystemExit(143)  # SIGTERM from the test (timeout): run the finally below, stop everything


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    env = {**os.environ, **H.S3_ENV, "PYTHONPATH": SRC, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           # notice a dead node within seconds (GCS health checks), so its tasks move on quickly
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_health_check_initial_delay_ms": "1000"}
    os.environ.update(env)
    procs = {}
    temp = f"/tmp/sdtk-ray-{os.getpid()}"
    try:
        t0 = time.monotonic()
        moto = H.MotoServer(work / "moto.log")
        procs["moto"] = moto.proc
        report["objects"] = moto.upload(Path(args.corpus))
        port = H.free_port()
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=80000000", "--block"]
        ray = str(Path(sys.executable).with_name("ray"))
        head_log, worker_log = work / "ray-head.log", work / "ray-worker.log"
        for attempt in range(3):  # ray start gives a node 30 s to register: on a loaded machine, try again
            procs["head"] = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                              "--disable-usage-stats", f"--temp-dir={temp}", *common],
                                             stdout=open(head_log, "wb"), stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            try:
                wait_for(head_log, "Ray runtime started", procs["head"], 150)
                break
            except RuntimeError:
                H.stop_session(procs["head"], timeout=5)
                if attempt == 2:
                    raise
        report["head_node_attempts"] = attempt + 1
        for attempt in range(3):  # ray start gives a node 30 s to register: on a loaded machine, try again
            procs["worker"] = subprocess.Popen([ray, "start", f"--address=127.0.0.1:{port}", *common],
                                               stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
            try:
                wait_for(worker_log, "Ray runtime started", procs["worker"], 150, also=procs["head"])
                break
            except RuntimeError:
                H.stop_session(procs["worker"], timeout=5)
                if attempt == 2:
                    raise
        report["worker_node_attempts"] = attempt + 1
        report["cluster_up_s"] = round(time.monotonic() - t0, 1)
        address = f"127.0.0.1:{port}"
        base = [sys.executable, "-m", "sdtk", "batch"]
        ray_opts = ["--engine", "ray", "--ray-address", address, "--task-cpus", "1", "--s3-endpoint-url", moto.endpoint, "--json"]

        # 1. scan, killing the worker node once both nodes have returned rows
        scan_out = work / "scan.jsonl"
        t = time.monotonic()
        batch = subprocess.Popen(base + ["scan", f"s3://{H.BUCKET}/", "--out", str(scan_out), "--chunk", "2", *ray_opts],
                                 stdout=subprocess.PIPE, stderr=open(work / "scan.err", "wb"), env=env, start_new_session=True)
        procs["batch"] = batch
        deadline = time.monotonic() + 150
        killed = None
        while time.monotonic() < deadline and batch.poll() is None:
            rows = journal_rows(scan_out)
            nodes = {node_of(r) for r in rows}
            if len(nodes) >= 2 and len(rows) >= 10:
                before = {n: sum(node_of(r) == n for r in rows) for n in nodes}
                H.stop_session(procs["worker"], kill_now=True)  # SIGKILL at once: the node dies mid-task
                killed = {"rows_before": len(rows), "rows_by_node_before": before, "at_s": round(time.monotonic() - t, 1)}
                break
            time.sleep(0.05)
        out, _ = batch.communicate(timeout=max(10, deadline - time.monotonic()))
        report["scan"] = {"exit": batch.returncode, "summary": parse(out, "scan"), "killed": killed,
                          "seconds": round(time.monotonic() - t, 1)}
        if killed is not None:
            final = [json.loads(line) for line in scan_out.read_text().splitlines()[1:]] if scan_out.exists() else []
            report["scan"]["rows_by_node"] = {n: sum(node_of(r) == n for r in final) for n in {node_of(r) for r in final}}

        # 2. hash on what is left of the cluster (the head node)
        hash_out = work / "hash.jsonl"
        t = time.monotonic()
        res = subprocess.run(base + ["hash", f"s3://{H.BUCKET}/", "--out", str(hash_out), *ray_opts], capture_output=True,
                             text=True, env=env, timeout=150)
        report["hash"] = {"exit": res.returncode, "summary": parse(res.stdout, "hash"),
                          "stderr": res.stderr[-2000:], "seconds": round(time.monotonic() - t, 1)}

        # 3. the scan again: nothing changed, nothing is read
        t = time.monotonic()
        res = subprocess.run(base + ["scan", f"s3://{H.BUCKET}/", "--out", str(scan_out), *ray_opts], capture_output=True,
                             text=True, env=env, timeout=150)
        report["rescan"] = {"exit": res.returncode, "summary": parse(res.stdout, "rescan"),
                            "stderr": res.stderr[-2000:], "seconds": round(time.monotonic() - t, 1)}
    except Exception as e:
        import traceback

        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-3000:]
    finally:
        for name in ("batch", "worker", "head", "moto"):
            if name in procs:
                H.stop_session(procs[name], timeout=10)
        report["left_running"] = sum(len([p for p in H.session_pids(pr.pid) if H._alive(p)]) for pr in procs.values())
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
