"""Untrusted text stays text: file names, model metadata, tensor and pickle global names come
from the files (or whoever named them) and reach terminals and line-oriented output.

- `for_terminal(s)`: control characters (C0 and C1, DEL: escape sequences that set the window
  title or clear the screen), lone surrogates and bidirectional overrides become visible
  escapes (`\\x1b`, `\\u202e`); newlines too unless `keep_newlines`.
- `for_markup(value)`: the above, then rich markup escaped (`[bold]`, `[/x]` print as
  themselves): for values interpolated into strings rich parses as markup.
- `json_text(s)`: JSON output with the characters above written as `\\uXXXX` escapes.
- `line_field(s)`: one field of a TAB-separated record (`scan --lines`): backslash, TAB,
  newline and every other control character escaped as above, so no value can end a field or
  a record.
(`sdtk.report.terminal_text.TerminalText` is rich's Text with `for_terminal` applied: this
module itself imports no rich, so `--json` output starts without it.)
"""
from __future__ import annotations

import re
from typing import Any

# C0 controls, DEL, C1 controls; lone surrogates (not text: printing them fails); Unicode
# bidirectional embeddings/overrides/isolates (they reorder what the terminal shows).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_NL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_FIELD = re.compile("[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def _escape(match: "re.Match[str]") -> str:
    c = match.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_terminal(value: Any, *, keep_newlines: bool = False) -> str:
    """`value` as text a terminal shows as it is (no control sequences reach the terminal)."""
    text = value if isinstance(value, str) else str(value)
    pattern = _UNSAFE_KEEP_NL if keep_newlines else _UNSAFE
    if not pattern.search(text):
        return text
    # named escapes only for what they stand for; a backslash stays itself on a terminal
    return pattern.sub(lambda m: _escape(m) if m.group() != "\\" else "\\", text)


def for_markup(value: Any) -> str:
    """`value` safe to put inside a rich markup string: control characters neutralised and
    markup escaped, so `[/x]` neither crashes nor styles anything."""
    from rich.markup import escape

    return escape(for_terminal(value))


_JSON_UNSAFE = re.compile("[\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def json_text(text: str) -> str:
    """JSON text (from json.dumps with ensure_ascii=False, which already escapes C0 controls)
    with DEL, C1 controls, lone surrogates and bidi overrides written as `\\uXXXX` escapes:
    the same JSON value, safe to print and always encodable."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def line_field(value: Any) -> str:
    """`value` as one field of a TAB-separated line: `\\` `\\t` `\\n` and other controls escaped."""
    text = value if isinstance(value, str) else str(value)
    return _FIELD.sub(_escape, text) if _FIELD.search(text) else text
