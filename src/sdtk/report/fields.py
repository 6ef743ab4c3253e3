"""Turn an Identity's raw details into the strings messages show (sizes, lists, names)."""
from __future__ import annotations

from typing import Any, Dict, Iterable

from sdtk.architectures import title_of  # noqa: F401 - re-exported (the report and the CLI import it here)

MAX_ITEMS = 8


def human_bytes(n: int) -> str:
    """Decimal units, as file managers and model sites print them (2.13 GB)."""
    n = int(n or 0)
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if n < 100 * size else f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    n = int(n or 0)
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def join(items: Iterable[Any], limit: int = MAX_ITEMS) -> str:
    items = [str(i) for i in items]
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", ... (+{len(items) - limit})"
    return ", ".join(items)


COMPONENT_FIELDS = ("component", "components", "missing")


def localise(details: Dict[str, Any], lang: str) -> Dict[str, Any]:
    """Component names in details shown as the language's labels ("text_encoder" -> "Text encoder 1")."""
    from sdtk.report.messages import has, text

    def label(name):
        return text(f"component.{name}", lang) if isinstance(name, str) and has(f"component.{name}", lang) else name

    out = dict(details)
    for key in COMPONENT_FIELDS:
        if key in out:
            value = out[key]
            out[key] = [label(v) for v in value] if isinstance(value, (list, tuple)) else label(value)
    return out


def prepare(details: Dict[str, Any], lang: str = "en") -> Dict[str, Any]:
    details = localise(details, lang)
    out: Dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, (list, tuple, set)):
            out[key] = join(sorted(value) if isinstance(value, set) else value) or "-"
        elif isinstance(value, dict):
            out[key] = join(f"{k}: {v}" for k, v in value.items())
        elif value is None:
            out[key] = "?"
        else:
            out[key] = value
        if (key.endswith("size") or key.endswith("bytes")) and isinstance(value, int):
            out[f"{key}_h"] = human_bytes(value)
    if "damaged_positions" in details:
        out["positions"] = join(details["damaged_positions"], 12) or "-"
    if "base" in details:
        out["base_title"] = title_of(details["base"])
    if details.get("why_key"):
        from sdtk.report.messages import has, text

        out["why"] = text(details["why_key"], lang) if has(details["why_key"], lang) else ""
    if "ztsnr" in details:
        out["ztsnr_hint"] = " + zsnr" if details["ztsnr"] else ""
    if isinstance(details.get("max_abs_difference"), float):
        out["max_abs_difference"] = f"{details['max_abs_difference']:.3g}"
    return out
