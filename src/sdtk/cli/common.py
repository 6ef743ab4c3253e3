"""What every command shares: consoles, JSON output, one-line errors."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from sdtk.untrusted import for_markup, for_terminal, json_text


class SafeConsole(Console):
    """A rich Console that never passes control characters through: every string it turns into
    text (printed strings, table cells) has them made visible first (see sdtk.untrusted).
    Markup in untrusted values is escaped where they are interpolated (`for_markup`)."""

    def render_str(self, text: str, **kwargs):
        return super().render_str(for_terminal(text, keep_newlines=True), **kwargs)


console = SafeConsole(highlight=False, soft_wrap=True)
err_console = SafeConsole(stderr=True, highlight=False, soft_wrap=True)
esc = for_markup  # for untrusted values inside markup strings: f"[bold]{esc(path)}[/]"


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colours, UTF-8."""
    sys.stdout.write(json_text(json.dumps(data, indent=2, ensure_ascii=False, default=str)) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """A one-line error on stderr (no traceback)."""
    err_console.print(f"[bold red]sdtk:[/] {for_markup(message)}", markup=True, highlight=False)
