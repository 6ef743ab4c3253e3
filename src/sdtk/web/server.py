"""Run the app with uvicorn on an already-bound socket (a port in use is a clear message, and
`--port 0` picks a free one), open the browser, stop cleanly (running jobs are cancelled: their
temporary files removed)."""
from __future__ import annotations

import errno
import socket
import threading
import webbrowser
from typing import Callable, Optional

from sdtk.errors import SdtkError
from sdtk.web.settings import ServeSettings


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SdtkError(None, f"port {port} on {host} is in use (another sdtk serve?); choose another with --port N, "
                                  "or --port 0 for any free port") from None
        raise SdtkError(None, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(settings: ServeSettings) -> str:
    host = "127.0.0.1" if settings.local_only else settings.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{settings.port}/" + (f"?token={settings.token}" if settings.token else "")


def serve(settings: ServeSettings, sock: socket.socket, open_browser: bool = True,
          announce: Optional[Callable[[str], None]] = None) -> None:
    import uvicorn

    from sdtk.web.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                            proxy_headers=False, server_header=False)
    server = uvicorn.Server(config)
    url = url_of(settings)
    if announce:
        announce(url)
    if open_browser:
        threading.Timer(0.8, lambda: webbrowser.open(url)).start()
    try:
        server.run(sockets=[sock])
    finally:
        queue = getattr(getattr(app, "app", None), "state", None)
        web = getattr(queue, "web", None) if queue is not None else None
        if web is not None:
            web.queue.stop()
