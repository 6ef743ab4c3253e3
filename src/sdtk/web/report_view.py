"""The inspect report (sdtk.report's words, in en/ja/zh/ru) as plain data for the model page."""
from __future__ import annotations

from typing import Any, Dict, List

from sdtk.identify.model import Identity
from sdtk.report.fields import human_bytes, human_count, join, prepare
from sdtk.report.messages import text
from sdtk.report.render import adapter_lines, metadata_line, what_it_is

MAX_META_VALUE = 600


def component_label(name: str, model, lang: str) -> str:
    if name == "unet" and model == "dit":
        return text("component.dit", lang)
    label = text(f"component.{name}", lang)
    return label + (f" ({model})" if model and model not in ("unet", "dit") else "")


def report_view(ident: Identity, lang: str) -> Dict[str, Any]:
    rows: List[tuple] = [(text("label.what", lang), what_it_is(ident, lang)),
                         (text("label.file", lang), f"{ident.format}, {human_bytes(ident.file_size)}, {ident.tensor_count:,} "
                                                    f"{text('label.tensors', lang)}, {human_count(ident.parameters)} {text('label.params', lang)}")]
    if ident.kind != "unknown":
        rows.append((text("label.precision", lang), ident.precision))
    if ident.kind in ("checkpoint", "diffusion-model"):
        rows.append((text("label.ema", lang), text("ema.yes" if ident.has_ema else "ema.no", lang)))
        if ident.prediction_type:
            pred = text("prediction.line", lang, type=ident.prediction_type,
                        confidence=text(f"confidence.{ident.prediction_confidence}", lang),
                        source=text(f"source.{ident.prediction_source}", lang))
        else:
            pred = text("prediction.unknown", lang)
        rows.append((text("label.prediction", lang), pred))
    for line in adapter_lines(ident, lang) if ident.adapter else []:
        rows.append((text("label.adapter", lang), line))
    verdict = ident.safety.get("verdict")
    if verdict in ("safe", "read-safely"):
        rows.append((text("label.safety", lang), text(f"safety.{verdict}", lang)))
    meta = metadata_line(ident)
    if meta:
        rows.append((text("label.metadata", lang), meta))
    largest = max((c.bytes for c in ident.components.values()), default=0) or 1  # the largest bar is full width
    components = [{"label": component_label(n, c.model, lang), "prefix": c.prefix or "-", "tensors": len(c.keys),
                   "parameters": human_count(c.parameters), "dtypes": join(sorted(c.dtypes, key=lambda d: -c.dtypes[d])),
                   "bytes": c.bytes, "size": human_bytes(c.bytes), "share": c.bytes / largest}
                  for n, c in ident.components.items()]
    missing = [component_label(n, None, lang) for n in ident.missing_components]
    problems = [{"severity": p.severity, "code": p.code, "message": text(p.message_key, lang, **prepare(p.details, lang))}
                for p in ident.problems]
    advice = [{"code": a.code, "message": text(a.message_key, lang, **prepare(a.details, lang))} for a in ident.advice]
    return {"rows": rows, "components": components, "missing": missing,
            "missing_note": text("label.missing" if ident.kind == "checkpoint" else "label.separate", lang),
            "problems": problems, "advice": advice,
            "labels": {k: text(f"label.{k}", lang) for k in ("components", "problems", "advice", "no_problems", "metadata")}}


def metadata_rows(metadata: Dict[str, str]) -> List[tuple]:
    """(key, value, truncated) for the header metadata, ModelSpec and kohya ss_* first."""
    def order(k: str):
        return (0 if k.startswith("modelspec.") else 1 if k.startswith("ss_") else 2, k)

    out = []
    for k in sorted(metadata, key=order):
        v = str(metadata[k])
        out.append((k, v[:MAX_META_VALUE], len(v) > MAX_META_VALUE))
    return out
