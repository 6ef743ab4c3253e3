"""What one `sdtk serve` process is configured with: roots, database, where it listens, the token."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from sdtk.errors import SdtkError, UsageError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_PORT = 8765


@dataclass
class ServeSettings:
    db: Path  # the library database
    roots: List[str]  # real paths of the folders this server may read and write under
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: Optional[str] = None  # required on every request when not on loopback
    state_dir: Optional[Path] = None  # undo log, job log (default: beside the database)
    index_roots: List[str] = field(default_factory=list)  # roots to (re)index in the background at start
    removal: str = "trash"  # where "remove" moves files: the system trash (quarantine when none), or quarantine
    progress_delay: float = 0.0  # tests only: seconds of sleep per progress report (makes cancel testable)

    @property
    def local_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def allowed_hosts(self) -> List[str]:
        """Host header values accepted (DNS rebinding defence): loopback names with our port,
        plus the --host name when one was given (with a token)."""
        hosts = [f"{h}:{self.port}" for h in LOOPBACK_HOSTS]
        if not self.local_only:
            h = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
            hosts.append(f"{h}:{self.port}")
        return hosts

    def allowed_origins(self) -> List[str]:
        return [f"http://{h}" for h in self.allowed_hosts()]

    @property
    def state_folder(self) -> Path:
        return self.state_dir or Path(self.db).parent / "sdtk-web"


def real_root(path: "os.PathLike[str] | str") -> str:
    """A --root as a real path; refused (SdtkError) when it is not a folder."""
    p = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(p):
        raise SdtkError(path, "--root: no such folder")
    if not os.path.isdir(p):
        raise SdtkError(path, "--root: not a folder")
    return p


def check_listen(host: str, token: Optional[str]) -> Tuple[str, Optional[str]]:
    """127.0.0.1 unless --host is given together with --token (then the token guards every request)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return host, token
    if not token:
        raise UsageError(None, f"--host {host} exposes the library beyond this computer; give --token TOKEN too "
                               f"(for example --token {secrets.token_urlsafe(16)})")
    if len(token) < 16:
        raise UsageError(None, "--token must be at least 16 characters")
    return host, token
