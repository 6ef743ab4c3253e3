"""Message catalogues: one JSON file per language in report/messages/ (en, ja, zh, ru).
A missing key falls back to English; a missing field in a message never crashes a report."""
from __future__ import annotations

import json
import string
from functools import lru_cache
from importlib import resources
from typing import Any, Dict

LANGUAGES = ("en", "ja", "zh", "ru")
DEFAULT = "en"


@lru_cache(maxsize=None)
def catalogue(lang: str) -> Dict[str, str]:
    if lang not in LANGUAGES:
        raise KeyError(f"no message catalogue for language {lang!r} (have: {', '.join(LANGUAGES)})")
    ref = resources.files("sdtk.report").joinpath("messages", f"{lang}.json")
    with ref.open("r", encoding="utf-8") as fh:
        return json.load(fh)


class _Lenient(dict):
    def __missing__(self, key):  # an absent field shows as "?" rather than failing the report
        return "?"


def text(key: str, lang: str = DEFAULT, **fields: Any) -> str:
    """The message `key` in `lang` (English when that language lacks it), fields filled in."""
    template = catalogue(lang).get(key) or catalogue(DEFAULT).get(key) or key
    try:
        return string.Formatter().vformat(template, (), _Lenient(fields))
    except (ValueError, IndexError):
        return template


def has(key: str, lang: str = DEFAULT) -> bool:
    return key in catalogue(lang) or key in catalogue(DEFAULT)
