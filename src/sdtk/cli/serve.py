"""`sdtk serve`: the local web app (library, model pages, jobs) on 127.0.0.1 (thin: settings -> sdtk.web)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from sdtk.cli.common import console, err_console
from sdtk.errors import SdtkError

DB_HELP = "Library database file (default: SDTK_LIBRARY_DB, else the per-user data folder)."


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        roots: List[Path] = typer.Option([], "--root", help="A model folder to serve (repeatable). Default: the folders the library has scanned."),
        port: int = typer.Option(8765, "--port", help="Port (0: any free port)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Listen on another address (needs --token): other computers can then reach it."),
        token: Optional[str] = typer.Option(None, "--token", help="Secret every request must carry (required with --host)."),
        db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        no_browser: bool = typer.Option(False, "--no-browser", help="Do not open a browser."),
        remove_to: str = typer.Option("trash", "--remove-to", help="Where removing a duplicate moves it: trash (the system trash; the quarantine folder when the drive has none) or quarantine (<root>/.sdtk-quarantine). Never a permanent delete."),
    ) -> int:
        """A local web app over the library: search, model pages, convert/merge/scan/hash and LoRA apply/merge/resize jobs, duplicates."""
        try:
            import jinja2  # noqa: F401
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            raise SdtkError(None, f"sdtk serve needs the web packages ({e.name} is missing): pip install 'sdtk[web]'") from None
        from sdtk.library import db as dbmod
        from sdtk.web.server import bind, serve
        from sdtk.web.settings import ServeSettings, check_listen, real_root

        host, token = check_listen(host, token)
        if remove_to not in ("trash", "quarantine"):
            from sdtk.errors import UsageError

            raise UsageError(None, f"--remove-to {remove_to}: choose trash or quarantine")
        db_path = Path(db).expanduser() if db is not None else dbmod.default_db_path()
        conn = dbmod.connect(db_path)
        try:
            known = [r[0] for r in conn.execute("SELECT path FROM roots WHERE online = 1 ORDER BY path")]
        finally:
            conn.close()
        chosen = [real_root(r) for r in roots] or [os.path.realpath(r) for r in known if os.path.isdir(r)]
        if not chosen:
            raise SdtkError(None, "no model folders to serve: give one or more with --root DIR")
        chosen = list(dict.fromkeys(chosen))
        new = [r for r in chosen if r not in known]
        sock = bind(host, port)
        settings = ServeSettings(db=db_path, roots=chosen, host=host, port=sock.getsockname()[1], token=token,
                                 index_roots=new, removal=remove_to, progress_delay=float(os.environ.get("SDTK_WEB_PROGRESS_DELAY", "0") or 0))
        if not settings.local_only:
            err_console.print(f"[bold yellow]warning:[/] listening on {host}: anyone who can reach this address and has "
                              "the token can read and convert your model files")

        def announce(url: str) -> None:
            console.print(f"sdtk serve: {url}  (library {db_path}; folders: {', '.join(chosen)})", markup=False, highlight=False)
            if new:
                console.print(f"indexing {len(new)} new folder(s) in the background; progress on the page", markup=False)
            console.print("Ctrl-C stops the server (running jobs are cancelled cleanly).", markup=False)

        serve(settings, sock, open_browser=not no_browser, announce=announce)
        return 0
