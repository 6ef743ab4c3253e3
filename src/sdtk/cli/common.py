"""What every command shares: consoles, JSON output, one-line errors."""
from __future__ import annotations

import json
import os
import sys
from typing import Any


from sdtk.untrusted import for_markup, for_terminal, json_text

esc = for_markup  # for untrusted values inside markup strings: f"[bold]{esc(path)}[/]"


def _safe_console(**options: Any):
    """A rich Console that never passes control characters through: every string it turns into
    text (printed strings, table cells) has them made visible first (see sdtk.untrusted).
    Markup in untrusted values is escaped where they are interpolated (`for_markup`)."""
    from rich.console import Console

    class SafeConsole(Console):
        def render_str(self, text: str, **kwargs):
            return super().render_str(for_terminal(text, keep_newlines=True), **kwargs)

    return SafeConsole(**options)

class _LazyConsole:
    """A safe rich Console (see `_safe_console`) made on first use: `--json` output and errors never import rich (start-up)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console = None

    def real(self):
        if self._console is None:
            self._console = _safe_console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __enter__(self):  # rich's Live and Progress use `with console:`
        return self.real().__enter__()

    def __exit__(self, *exc):
        return self.real().__exit__(*exc)

    @property
    def is_terminal(self) -> bool:
        """rich's answer, without importing rich when the stream is plainly not a terminal."""
        if self._console is None and not any(os.environ.get(v) for v in _TERMINAL_ENV):
            stream = sys.stderr if self._options.get("stderr") else sys.stdout
            try:
                if not stream.isatty():
                    return False
            except (AttributeError, ValueError):
                return False
        return self.real().is_terminal


# Variables that make rich treat a non-tty as a terminal (rich/console.py): ask rich then.
_TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES")


console = _LazyConsole(highlight=False, soft_wrap=True)
err_console = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colours, UTF-8."""
    sys.stdout.write(json_text(json.dumps(data, indent=2, ensure_ascii=False, default=str)) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """A one-line error on stderr (no traceback)."""
    err_console.print(f"[bold red]sdtk:[/] {for_markup(message)}", markup=True, highlight=False)
