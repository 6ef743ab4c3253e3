"""The human report: rich text in the user's language (message catalogues in messages/)."""
from __future__ import annotations

import os
from typing import List

from rich.cells import cell_len
from rich.console import Group
from rich.table import Table
from sdtk.report.terminal_text import TerminalText as Text  # untrusted names reach the terminal as text

from sdtk.identify.model import Identity
from sdtk.report.fit import shorten_middle
from sdtk.report.fields import human_bytes, human_count, join, prepare, title_of
from sdtk.report.messages import text

SEVERITY_STYLE = {"error": ("✗", "bold red"), "warning": ("!", "yellow"), "info": ("i", "cyan")}


def _t(key: str, lang: str, /, **fields) -> str:
    return text(key, lang, **fields)


def _row(rows: Table, label: str, value: str) -> None:
    rows.add_row(Text(label, style="bold"), Text(value))  # Text: names like "FLUX.1 [dev]" are not markup


# Reports fit the terminal: long lines wrap with a hanging indent (the text column of a grid wraps
# even on a soft-wrapping console), long key prefixes are shortened in the middle.
MIN_PREFIX_WIDTH = 8  # narrower than this, the prefix column is left out
GAP = 2  # cells between two columns of the component table


def hanging(lead: str, body, lead_style: str = "", body_style: str = "") -> Table:
    """`lead` then `body`; when `body` wraps, its next lines start under its first character."""
    grid = Table.grid()
    if lead:
        grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    body = body if isinstance(body, Text) else Text(str(body), style=body_style)
    grid.add_row(*([Text(lead, style=lead_style)] if lead else []), body)
    return grid


class ComponentTable:
    """The component rows, laid out for the width they are printed at: labels never break, the key
    prefix is shortened in the middle (and left out when the terminal is too narrow)."""

    def __init__(self, rows: List[tuple]):
        self.rows = rows  # (label, prefix, keys, parameters, dtypes, bytes), strings

    def __rich_console__(self, console, options):
        width = options.max_width
        widths = [max((cell_len(r[i]) for r in self.rows), default=0) for i in range(6)]
        shown = [0, 2, 3, 4, 5]  # label, keys, parameters, dtypes, bytes; the prefix if it fits
        budget = width - sum(widths[i] for i in shown) - GAP * len(shown)
        if budget >= MIN_PREFIX_WIDTH:
            shown.insert(1, 1)
        elif sum(widths[i] for i in shown) + GAP * (len(shown) - 1) > width:
            shown.remove(2)  # still too narrow: the tensor count goes too
        table = Table(show_header=False, box=None, padding=(0, GAP // 2), pad_edge=False)
        for i in shown:
            table.add_column(no_wrap=True, justify="right" if i in (2, 5) else "left")
        for row in self.rows:
            cells = [shorten_middle(row[1], budget) if i == 1 else row[i] for i in shown]
            table.add_row(*map(Text, cells))
        yield table


def what_it_is(ident: Identity, lang: str) -> str:
    kind = _t(f"kind.{ident.kind}", lang)
    if ident.kind == "unknown":
        return _t("what.unknown", lang, tensors=ident.tensor_count, params_h=human_count(ident.parameters))
    if ident.adapter is not None and "/" in ident.architecture:
        base = ident.adapter.get("base_architecture")
        return _t("what.adapter", lang, kind=kind, base=title_of(base) if base else _t("base.unknown", lang), architecture=ident.architecture)
    line = _t("what.model", lang, title=ident.title or ident.architecture, kind=kind, architecture=ident.architecture)
    if ident.variant:
        line += "; " + _t("what.variant", lang, variant=ident.variant)
    return line


def _component_label(name: str, model, lang: str) -> str:
    if name == "unet" and model == "dit":
        return _t("component.dit", lang)
    label = _t(f"component.{name}", lang)
    if model and model not in ("unet", "dit"):
        label += f" ({model})"
    return label


def summary_line(ident: Identity, lang: str = "en", name: str = "") -> str:
    """One line for folder listings: file, what, precision, size, problem count."""
    name = name or os.path.basename(ident.path.rstrip("/")) or ident.path
    n_problems = sum(1 for p in ident.problems if p.counts)
    mark = "ok" if not n_problems and ident.identified else f"{n_problems}!"
    kind = _t(f"kind.{ident.kind}", lang)
    arch = f"{ident.architecture} ({ident.variant})" if ident.variant and ident.variant not in ident.architecture else ident.architecture
    what = f"{arch}  [{kind}]" if ident.identified else f"[{kind}]"
    return f"{mark:>3}  {name}  {what}  {ident.precision}  {human_bytes(ident.file_size)}"


def listing_line(ident: Identity, lang: str = "en", name: str = "") -> Table:
    """`summary_line` as a renderable that wraps under the file name when the terminal is narrow."""
    mark, _, rest = summary_line(ident, lang, name).partition("  ")
    return hanging(f"{mark}  ", rest)


def render_identity(ident: Identity, lang: str = "en", verbose: bool = False) -> Group:
    parts: List = []
    parts.append(hanging("", Text(ident.path, style="bold")))
    rows = Table.grid(padding=(0, 2))
    rows.add_column(no_wrap=True)
    rows.add_column()
    _row(rows, _t("label.what", lang), what_it_is(ident, lang))
    _row(rows, _t("label.file", lang), f"{ident.format}, {human_bytes(ident.file_size)}, {ident.tensor_count:,} {_t('label.tensors', lang)}, "
                                         f"{human_count(ident.parameters)} {_t('label.params', lang)}")
    if ident.kind != "unknown":
        _row(rows, _t("label.precision", lang), ident.precision)
    if ident.kind in ("checkpoint", "diffusion-model"):
        _row(rows, _t("label.ema", lang), _t("ema.yes" if ident.has_ema else "ema.no", lang))
        if ident.prediction_type:
            pred = _t("prediction.line", lang, type=ident.prediction_type, confidence=_t(f"confidence.{ident.prediction_confidence}", lang),
                      source=_t(f"source.{ident.prediction_source}", lang))
            if ident.zero_terminal_snr:
                pred += ", " + _t("prediction.ztsnr", lang)
        else:
            pred = _t("prediction.unknown", lang)
        _row(rows, _t("label.prediction", lang), pred)
    if ident.adapter:
        for line in adapter_lines(ident, lang):
            _row(rows, _t("label.adapter", lang), line)
    verdict = ident.safety.get("verdict")
    if verdict in ("safe", "read-safely"):
        _row(rows, _t("label.safety", lang), _t(f"safety.{verdict}", lang))
    if ident.vae_comparison:
        vc = ident.vae_comparison
        _row(rows, _t("label.vae_ref", lang), _t(vc.get("message_key", "vae.different"), lang, **prepare(vc, lang)))
    meta = metadata_line(ident)
    if meta:
        _row(rows, _t("label.metadata", lang), meta)
    parts.append(rows)
    if ident.components:
        parts.append(Text(_t("label.components", lang), style="bold"))
        rows = []
        for name, c in ident.components.items():
            rows.append(("  " + _component_label(name, c.model, lang), c.prefix or "-", f"{len(c.keys) if c.keys else ''}",
                         human_count(c.parameters), join(sorted(c.dtypes, key=lambda d: -c.dtypes[d])), human_bytes(c.bytes)))
        parts.append(ComponentTable(rows))
        if ident.missing_components:
            note = _t("label.missing" if ident.kind == "checkpoint" else "label.separate", lang)
            for name in ident.missing_components:
                parts.append(hanging("  ", Text(f"{_component_label(name, None, lang)} ({note})")))
    if ident.quantization:
        parts.extend(_quantization_lines(ident, lang))
    if ident.unknown_summary:
        parts.append(Text(_t("label.unknown", lang), style="bold"))
        for g in ident.unknown_summary["prefixes"]:
            parts.append(hanging("  ", _t("unknown.prefix", lang, prefix=g["prefix"], tensors=g["tensors"], params_h=human_count(g["parameters"]),
                                          dtypes=join(g["dtypes"]))))
        for t in ident.unknown_summary["largest_tensors"][:5]:
            parts.append(hanging("  ", _t("unknown.largest", lang, key=t["key"], shape=t["shape"], dtype=t["dtype"])))
    parts.append(Text(_t("label.problems", lang), style="bold"))
    shown = [p for p in ident.problems if verbose or p.severity != "info" or p.code in ("training_state", "sdxl_vae_fp16", "extra_keys", "unknown_keys", "needs_config_yaml")]
    if not shown:
        parts.append(hanging("  ", _t("label.no_problems", lang), body_style="green"))
    for p in shown:
        mark, style = SEVERITY_STYLE.get(p.severity, ("?", ""))
        parts.append(hanging(f"  {mark} ", _t(p.message_key, lang, **prepare(p.details, lang)), lead_style=style))
    if ident.advice:
        parts.append(Text(_t("label.advice", lang), style="bold"))
        for a in ident.advice:
            parts.append(hanging("  • ", _t(a.message_key, lang, **prepare(a.details, lang))))
    if verbose and ident.notes:
        parts.append(Text(_t("label.notes", lang), style="bold"))
        for n in ident.notes:
            parts.append(hanging("  ", n, body_style="dim"))
    return Group(*parts)


def adapter_lines(ident: Identity, lang: str) -> List[str]:
    a = ident.adapter or {}
    lines = []
    if ident.kind == "lora":
        lines.append(_t("adapter.lora", lang, **prepare({k: a.get(k) for k in ("algorithm", "format", "modules", "ranks", "alphas")})))
        if a.get("targets"):
            lines.append(_t("adapter.targets", lang, targets=join(f"{k} ({v})" for k, v in a["targets"].items())))
    elif ident.kind == "embedding":
        lines.append(_t("adapter.embedding", lang, vectors=a.get("vectors")) + (f", {a['name']}" if a.get("name") else ""))
    elif ident.kind == "hypernetwork":
        lines.append(_t("adapter.hypernetwork", lang, widths=join(a.get("widths", []))))
    elif ident.kind in ("controlnet", "t2i-adapter"):
        lines.append(_t("adapter.controlnet", lang, format=a.get("format")))
    training = ident.metadata.get("training") or {}
    if training.get("ss_sd_model_name") or training.get("ss_steps"):
        lines.append(_t("adapter.training", lang, **prepare({k: training.get(k) for k in ("ss_sd_model_name", "ss_steps", "ss_resolution")})))
    if training.get("top_tags"):
        lines.append(_t("adapter.tags", lang, tags=join(training["top_tags"])))
    return lines


def metadata_line(ident: Identity) -> str:
    m = ident.metadata
    bits = []
    spec = m.get("modelspec")
    if spec:
        bits.append("ModelSpec " + join(f"{k}={v}" for k, v in spec.items() if k in ("architecture", "title", "prediction_type", "resolution", "author")))
    if m.get("training") and ident.kind not in ("lora",):
        bits.append("kohya ss_* " + join(f"{k}={v}" for k, v in m["training"].items() if k in ("ss_base_model_version", "ss_steps")))
    if m.get("merge"):
        bits.append("merge recipe: " + join(m["merge"].keys()))
    if m.get("lineage"):
        bits.append("lineage: " + join(m["lineage"].keys(), 4))
    if m.get("other_keys"):
        bits.append("other: " + join(m["other_keys"], 5))
    return "; ".join(bits)


def _quantization_lines(ident: Identity, lang: str) -> List:
    """The Quantization section: per component types, bits/weight, size vs bf16, kept weights, loaders."""
    q = ident.quantization
    lines: List = [Text(_t("label.quantization", lang), style="bold")]
    for name, c in q["components"].items():
        types = join(f"{n} {k}" for k, n in sorted(c["types"].items(), key=lambda kv: -kv[1]))
        comp = ident.components.get(name)
        label = _component_label(name, comp.model if comp else None, lang) if comp else name
        lines.append(Text("  " + _t("quant.component", lang, component=label, types=types, bpw=c["bits_per_weight"],
                                    size_h=human_bytes(c["bytes"]), bf16_h=human_bytes(c["bf16_bytes"]),
                                    percent=round(100 * (c["size_vs_bf16"] or 0)))))
        if c["high_precision_weights"]:
            lines.append(Text("    " + _t("quant.kept", lang, n=c["high_precision_weights"], params_h=human_count(c["high_precision_parameters"]),
                                          examples=join(c["high_precision_examples"], 3))))
    lines.append(Text("  " + _t("quant.loaders", lang, loaders=join(q["loaders"]), not_loaders=join(q["not_loaders"]))))
    for caveat in q["caveats"]:
        lines.append(Text("  ! " + caveat, style="yellow"))
    return lines
