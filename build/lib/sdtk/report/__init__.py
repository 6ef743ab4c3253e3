"""Identity -> words for people (rich text, four languages) and -> versioned JSON."""
from sdtk.report.json_report import json_report
from sdtk.report.messages import LANGUAGES, text
from sdtk.report.render import render_identity, summary_line

__all__ = ["LANGUAGES", "json_report", "render_identity", "summary_line", "text"]
