"""The batch tests' corpus and servers: a few hundred objects of every kind a model hub holds
(sample layouts, LoRAs, embeddings, a .ckpt, hostile pickles, truncated files, non-model files),
and an S3 API server (moto's server mode) on 127.0.0.1, started and stopped by process id."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import helpers_readers as R  # noqa: E402
from helpers_library import tiny_lora_bytes  # noqa: E402

from sdtk.formats.safetensors import write_safetensors  # noqa: E402
from sdtk.formats.torchzip_write import write_torch_zip  # noqa: E402
from sdtk.samples import LAYOUT_NAMES, layout_plan, load_layout  # noqa: E402
from sdtk.tensors import from_array  # noqa: E402

BUCKET = "models"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "NO_PROXY": "127.0.0.1,localhost"}


def build_corpus(root: Path, marker: Path) -> Dict[str, str]:
    """Write the corpus under `root`; returns {relative path: expected scan verdict}. Hostile
    files would create `marker` if anything ever ran them."""
    root.mkdir(parents=True, exist_ok=True)
    expect: Dict[str, str] = {}

    def put(rel: str, data: bytes, verdict: str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expect[rel] = verdict

    # sample layouts (real key/shape tables, every dim > 8 divided by 64, zeros)
    for name in LAYOUT_NAMES:
        for seed in range(2):
            p = root / "checkpoints" / f"{name}-{seed}.safetensors"
            p.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(p, layout_plan(load_layout(name).with_dtype("float16"), scale=64), {"seed": str(seed)}, overwrite=True)
            expect[str(p.relative_to(root))] = "safe"
    # one .ckpt (PyTorch zip, a thousand storages) and one large-data safetensors: header-only reads
    ckpt = root / "checkpoints" / "sd15-emaonly.ckpt"
    write_torch_zip(ckpt, layout_plan(load_layout("sd15-emaonly").with_dtype("float16"), scale=8), wrap="state_dict", overwrite=True)
    expect[str(ckpt.relative_to(root))] = "safe"
    big = root / "checkpoints" / "big-data.safetensors"
    write_safetensors(big, [from_array("model.weight", np.zeros((4096, 2048), np.float32))], overwrite=True)
    expect[str(big.relative_to(root))] = "safe"
    rng = np.random.default_rng(7)
    for i in range(80):
        put(f"loras/lora_{i:03d}.safetensors", tiny_lora_bytes(rng, {"ss_base_model_version": "sdxl_base_v1-0", "n": str(i)}), "safe")
    for i in range(40):
        p = root / "embeddings" / f"emb_{i:03d}.pt"
        p.parent.mkdir(parents=True, exist_ok=True)
        vec = from_array("string_to_param.*", rng.standard_normal((1 + i % 4, 768)).astype(np.float32))
        write_torch_zip(p, [vec], extras={"name": f"emb{i}", "step": i}, overwrite=True)
        expect[str(p.relative_to(root))] = "safe"
    payloads = [R.os_system_payload, R.exec_payload, R.dotted_payload, R.frame_hidden_payload]
    for i in range(48):
        data = payloads[i % len(payloads)](marker)
        if i % 3 == 0:  # inside a .ckpt zip as its data.pkl
            put(f"hostile/evil_{i:03d}.ckpt", R.zip_bytes(R.minimal_checkpoint_records(data)), "unsafe")
        else:
            put(f"hostile/evil_{i:03d}.pkl", data, "unsafe")
    loras = sorted((root / "loras").iterdir())
    embs = sorted((root / "embeddings").iterdir())
    for i in range(40):
        src = (loras if i % 2 == 0 else embs)[i]
        data = src.read_bytes()
        cut = max(9, int(len(data) * (0.2 + 0.6 * rng.random())))
        put(f"truncated/{src.stem}_cut{cut}{src.suffix}", data[:cut], "unreadable")
    for i in range(30):
        kind = i % 3
        data = (f"notes {i}\n" * 20).encode() if kind == 0 else (
            b"\x89PNG\r\n\x1a\n" + rng.bytes(200) if kind == 1 else json.dumps({"civitai": i}).encode())
        put(f"misc/file_{i:03d}" + (".txt", ".png", ".json")[kind], data, "unreadable")
    return expect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_session(proc: subprocess.Popen, timeout: float = 10.0, kill_now: bool = False) -> None:
    """Stop a process started with start_new_session=True and every process of its session
    (SIGTERM, then SIGKILL after `timeout`; `kill_now`: SIGKILL at once)."""
    sid = proc.pid
    for sig in ((signal.SIGKILL,) if kill_now else (signal.SIGTERM, signal.SIGKILL)):
        pids = session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline and any(_alive(p) for p in session_pids(sid)):
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        if not any(_alive(p) for p in session_pids(sid)):
            break
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def session_pids(sid: int):
    """Processes whose session id is `sid` (the ones a start_new_session child started)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid:
                    out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` in its own session; `stop()` ends it by process id."""

    def __init__(self, log: Path, env: Optional[dict] = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **S3_ENV, **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).read()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start (see {log})")
                time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def upload(self, root: Path, bucket: str = BUCKET, public: bool = False) -> int:
        c = self.client()
        c.create_bucket(Bucket=bucket)
        n = 0
        for p in sorted(root.rglob("*")):
            if p.is_file():
                extra = {"ACL": "public-read"} if public else {}
                c.put_object(Bucket=bucket, Key=str(p.relative_to(root)), Body=p.read_bytes(), **extra)
                n += 1
        return n

    def stop(self) -> None:
        stop_session(self.proc)
        self.log.close()
