"""Identity -> words for people (rich text, four languages) and -> versioned JSON."""
from sdtk.report.json_report import json_report
from sdtk.report.messages import LANGUAGES, text

__all__ = ["LANGUAGES", "json_report", "render_identity", "summary_line", "text"]


def __getattr__(name: str):
    """`render_identity` and `summary_line` import rich: loaded on first use (`--json` never does)."""
    if name in ("render_identity", "summary_line"):
        from sdtk.report import render

        return getattr(render, name)
    raise AttributeError(f"module 'sdtk.report' has no attribute {name!r}")
