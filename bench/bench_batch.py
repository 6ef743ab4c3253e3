"""`sdtk batch` over an S3 API server: header-only inspect objects/s and hash bytes/s, the local
engine against Ray with 1 and 2 worker nodes, the bytes fetched per object, the request latency
and the CPU per object (the inputs of the scaling model in docs/batch.md).

Everything runs on 127.0.0.1 inside a network namespace whose only interface is loopback
(`unshare -n`; the script re-runs itself there): moto's S3 server, a Ray head (0 CPUs: it only
schedules) and 1, then 2, worker nodes of 1 CPU each. Writes bench/results/batch.md.

    python bench/bench_batch.py                 # ~5-10 minutes on a loaded 2-core machine
    python bench/bench_batch.py --hash-mib 64   # smaller hash set
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


def inside(args) -> dict:
    import helpers_batch as H
    from sdtk.batch import LocalEngine, RayEngine, run_batch
    from sdtk.batch.listing import list_s3
    from sdtk.batch.work import process_object

    os.environ.update(H.S3_ENV)
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    work = Path(args.work)
    out: dict = {"load_before": os.getloadavg()}
    corpus = work / "corpus"
    H.build_corpus(corpus, work / "marker")
    hashset = work / "hashset"
    hashset.mkdir()
    for i in range(args.hash_objects):
        (hashset / f"blob_{i:03d}.bin").write_bytes(os.urandom(args.hash_mib * 1024 * 1024 // args.hash_objects))
    moto = H.MotoServer(work / "moto.log")
    procs = []
    try:
        out["inspect_objects"] = moto.upload(corpus, bucket="models")
        out["hash_objects"] = moto.upload(hashset, bucket="blobs")
        c = moto.client()
        lat = []
        for _ in range(50):
            t = time.perf_counter()
            c.get_object(Bucket="models", Key="loras/lora_000.safetensors", Range="bytes=0-0")["Body"].read()
            lat.append(time.perf_counter() - t)
        out["range_get_latency_ms"] = {"median": round(1000 * statistics.median(lat), 2), "p90": round(1000 * sorted(lat)[44], 2)}
        t = time.perf_counter()
        n = len(c.get_object(Bucket="blobs", Key="blob_000.bin")["Body"].read())
        out["single_stream_MBps"] = round(n / (time.perf_counter() - t) / 1e6, 1)
        refs = list(list_s3("s3://models/", moto.endpoint))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        rows = [process_object("inspect", r, {"endpoint_url": moto.endpoint}) for r in refs]
        out["inspect_sequential"] = {"cpu_ms_per_object": round(1000 * (time.process_time() - cpu0) / len(refs), 2),
                                     "wall_ms_per_object": round(1000 * (time.perf_counter() - wall0) / len(refs), 2),
                                     "fetched_bytes_per_object": round(sum(r["fetched_bytes"] for r in rows) / len(rows)),
                                     "requests_per_object": round(sum(r["requests"] for r in rows) / len(rows), 2)}
        hrefs = list(list_s3("s3://blobs/", moto.endpoint))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for r in hrefs[:4]:
            process_object("hash", r, {"endpoint_url": moto.endpoint})
        nbytes = sum(r.size for r in hrefs[:4])
        out["hash_sequential"] = {"cpu_s_per_GB": round((time.process_time() - cpu0) / nbytes * 1e9, 2),
                                  "MBps": round(nbytes / (time.perf_counter() - wall0) / 1e6, 1)}
        runs = []

        def measure(label, engine):
            for command, src in (("inspect", "s3://models/"), ("hash", "s3://blobs/")):
                res = work / f"{label}-{command}.jsonl"
                s = run_batch(command, [src], res, engine, endpoint_url=moto.endpoint)
                runs.append({"engine": label, "command": command, "objects": s.processed, "seconds": round(s.seconds, 2),
                             "objects_per_s": round(s.objects_per_s, 1), "object_MBps": round(s.object_bytes / s.seconds / 1e6, 1),
                             "fetched_bytes_per_object": round(s.fetched_bytes / max(1, s.processed)),
                             "requests_per_object": round(s.requests / max(1, s.processed), 2), "load": os.getloadavg()[0]})
                print(json.dumps(runs[-1]), flush=True)

        if not args.skip_local:
            measure("local, 1 process", LocalEngine(1))
            measure("local, 2 processes", LocalEngine(2))
        port = H.free_port()
        temp = work / "ray"
        ray = str(Path(sys.executable).with_name("ray"))
        common = ["--node-ip-address=127.0.0.1", "--object-store-memory=80000000", "--block"]
        from batch_cluster_driver import wait_for

        for attempt in range(3):  # a node has 30 s to register with the GCS: on a loaded machine, try again
            head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                                     "--disable-usage-stats", f"--temp-dir={temp}", *common],
                                    stdout=open(work / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for(work / "head.log", "Ray runtime started", head, 300)
                procs.append(head)
                break
            except RuntimeError:
                H.stop_session(head, timeout=5)
                if attempt == 2:
                    raise

        def add_worker(i):
            for attempt in range(3):
                log = work / f"worker{i}.log"
                p = subprocess.Popen([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *common],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    wait_for(log, "Ray runtime started", p, 300)
                    procs.append(p)
                    return
                except RuntimeError:
                    H.stop_session(p, timeout=5)
            raise RuntimeError("a Ray worker node did not start")

        add_worker(0)
        measure("ray, 1 worker node", RayEngine(f"127.0.0.1:{port}", task_cpus=1.0))
        add_worker(1)
        measure("ray, 2 worker nodes", RayEngine(f"127.0.0.1:{port}", task_cpus=1.0))
        out["runs"] = runs
    finally:
        for p in reversed(procs):
            H.stop_session(p, timeout=10)
        moto.stop()
    out["load_after"] = os.getloadavg()
    return out


def write_md(data: dict, path: Path) -> None:
    lines = ["# sdtk batch over an S3 API server (moto, 127.0.0.1): local engine vs Ray", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, **loaded** machine (2 cores shared with "
             f"other jobs; load {data['load_before'][0]:.1f} before, {data['load_after'][0]:.1f} after): compare rows "
             "of this run only. Everything on one machine: the S3 server, the head and the worker nodes share "
             "the same 2 cores, so more workers cannot mean more throughput here; the figures are the inputs "
             "of the scaling model in docs/batch.md.", "",
             f"- inspect set: {data['inspect_objects']} objects (the test corpus: sample layouts, LoRAs, embeddings, "
             ".ckpt, hostile, truncated, non-model files); hash set: " + str(data["hash_objects"]) + " random objects",
             f"- range GET latency (1 byte, sequential): median {data['range_get_latency_ms']['median']} ms, "
             f"p90 {data['range_get_latency_ms']['p90']} ms; one GET stream {data['single_stream_MBps']} MB/s",
             f"- inspect, one process, sequential: {data['inspect_sequential']['cpu_ms_per_object']} ms CPU and "
             f"{data['inspect_sequential']['wall_ms_per_object']} ms wall per object, "
             f"{data['inspect_sequential']['fetched_bytes_per_object']:,} bytes in "
             f"{data['inspect_sequential']['requests_per_object']} requests per object",
             f"- hash, one process: {data['hash_sequential']['cpu_s_per_GB']} s CPU per GB, {data['hash_sequential']['MBps']} MB/s",
             "", "| engine | command | objects | seconds | objects/s | MB/s of objects | bytes fetched / object | requests / object | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        lines.append(f"| {r['engine']} | {r['command']} | {r['objects']} | {r['seconds']} | {r['objects_per_s']} | "
                     f"{r['object_MBps']} | {r['fetched_bytes_per_object']:,} | {r['requests_per_object']} | {r['load']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work")
    ap.add_argument("--json-out")
    ap.add_argument("--hash-mib", type=int, default=256)
    ap.add_argument("--hash-objects", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "batch.md"))
    ap.add_argument("--skip-local", action="store_true", help="only the Ray runs (debugging)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args()
    if args.inside:
        Path(args.json_out).write_text(json.dumps(inside(args)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="sdtk-bench-batch-"))
    try:
        js = work / "result.json"
        inner = (f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} --inside --work {work / 'w'} "
                 f"--json-out {js} --hash-mib {args.hash_mib} --hash-objects {args.hash_objects}"
                 + (" --skip-local" if args.skip_local else ""))
        (work / "w").mkdir()
        subprocess.run(["unshare", "-n", "sh", "-c", inner], check=True, timeout=3600)
        data = json.loads(js.read_text())
        write_md(data, Path(args.out))
        print(Path(args.out).read_text())
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
