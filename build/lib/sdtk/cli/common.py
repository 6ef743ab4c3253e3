"""What every command shares: consoles, JSON output, one-line errors."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colours, UTF-8."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """A one-line error on stderr (no traceback)."""
    err_console.print(f"[bold red]sdtk:[/] {message}", markup=True, highlight=False)
