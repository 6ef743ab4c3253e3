"""rich's Text for untrusted names: code that builds Text objects itself bypasses the console's
string conversion, so control characters are made visible here (see sdtk.untrusted)."""
from __future__ import annotations

from rich.text import Text

from sdtk.untrusted import for_terminal


class TerminalText(Text):
    """rich.text.Text whose text (at creation and `append`) has control characters made visible."""

    def __init__(self, text: str = "", *args, **kwargs):
        super().__init__(for_terminal(text, keep_newlines=True), *args, **kwargs)

    def append(self, text, style=None):
        if isinstance(text, str):
            text = for_terminal(text, keep_newlines=True)
        return super().append(text, style)
