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
    shown = [p for p in ident.problems if verbose or p.severity != "info" or p.code in ("training_state", "sdxl_vae_fp16", "extra_keys", "unknown_keys", "needs_config_yaml", "lora_alpha_missing")]
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
    """The adapter rows of the report (LoRA, embedding, hypernetwork, ControlNet), in `lang`."""
    a = ident.adapter or {}
    lines: List[str] = []
    if ident.kind == "lora":
        lines += _lora_lines(ident, a, lang)
    elif ident.kind == "embedding":
        lines += _embedding_lines(a, lang)
    elif ident.kind == "hypernetwork":
        lines += _hypernetwork_lines(a, lang)
    elif ident.kind in ("controlnet", "t2i-adapter"):
        lines.append(_t("adapter.controlnet", lang, format=a.get("format")))
    training = ident.metadata.get("training") or {}
    if ident.kind != "lora" and (training.get("ss_sd_model_name") or training.get("ss_steps")):
        lines.append(_t("adapter.training", lang, **prepare({k: training.get(k) for k in ("ss_sd_model_name", "ss_steps", "ss_resolution")})))
    if ident.kind != "lora" and training.get("top_tags"):
        lines.append(_t("adapter.tags", lang, tags=join(training["top_tags"])))
    hashes = a.get("hashes")
    if hashes:
        lines.append(_t("adapter.hashes", lang, autov2=hashes["autov2"].upper(), autov3=hashes["autov3"].upper(),
                        a1111=hashes.get("a1111_short", "-")))
    return lines


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _rank_text(groups, lang: str) -> str:
    from sdtk.adapters.reading import KIND_LABELS

    kinds = {g["type"] for g in groups}
    bits = []
    for g in groups:
        label = KIND_LABELS.get(g["type"], g["type"])
        if g["rank"] is None:
            bits.append(_t("lora.full_modules", lang, type=label, modules=g["modules"]))
            continue
        alpha = _number(g["alpha"]) if g["alpha"] is not None else _t("lora.no_alpha", lang)
        text_ = _t("lora.rank_conv" if g["conv"] else "lora.rank", lang, rank=g["rank"], alpha=alpha, modules=g["modules"])
        if not kinds <= {"lora", "locon"}:
            text_ = f"{label} {text_}"
        bits.append(text_)
    return "; ".join(bits[:6]) + (f"; ... (+{len(bits) - 6})" if len(bits) > 6 else "")


def _touched_text(a, lang: str) -> str:
    from sdtk.identify.lora_facts import ranges

    parts = []
    family = None
    base = (a.get("base") or {}).get("architecture") or a.get("base_architecture")
    if base:
        from sdtk.architectures import family_of

        family = family_of(base)
    for comp, n in sorted(a.get("components_touched", {}).items(), key=lambda kv: kv[0] != "unet"):
        label = _component_label(comp, "dit" if comp == "unet" and family in ("flux", "sd3") else None, lang)
        groups = (a.get("blocks") or {}).get(comp, {})
        where = join((f"{g} {ranges(ix)}" if ix else g) for g, ix in groups.items() if g != "other") if groups else ""
        if "other" in groups:
            where = join([where, "other"]) if where else "other"
        parts.append(f"{label} {n} ({where})" if where else f"{label} {n}")
    return "; ".join(parts)


def _lora_lines(ident: Identity, a, lang: str) -> List[str]:
    lines = []
    types = a.get("types") or {}
    types_text = join(f"{k} {v}" for k, v in types.items()) if types else str(a.get("algorithm"))
    lines.append(_t("lora.types", lang, types=types_text, format=a.get("format"), modules=a.get("modules")))
    if a.get("rank_groups"):
        lines.append(_rank_text(a["rank_groups"], lang))
    if a.get("dora_modules"):
        lines.append(_t("lora.dora", lang, modules=a["dora_modules"]))
    if a.get("components_touched"):
        lines.append(_t("lora.touches", lang, parts=_touched_text(a, lang)))
    elif a.get("targets"):
        lines.append(_t("adapter.targets", lang, targets=join(f"{k} ({v})" for k, v in a["targets"].items())))
    base = a.get("base") or {}
    if base.get("architecture"):
        from sdtk.architectures import family_of

        same = family_of(base["architecture"])
        evidence = join(e["detail"] for e in base.get("evidence", []) if family_of(e["architecture"]) == same)
        lines.append(_t("lora.made_for", lang, title=title_of(a.get("base_architecture") or base["architecture"]),
                        confidence=_t(f"confidence.{base.get('confidence', 'none')}", lang), evidence=evidence or "-"))
    elif "base" in a:
        lines.append(_t("lora.made_for_unknown", lang))
    fit = a.get("claimed_base_fit")
    if fit and not fit["unmatched"]:
        lines.append(_t("lora.fits_layout", lang, modules=fit["modules"], title=title_of(a.get("base_architecture"))))
    if a.get("bundled_embeddings"):
        lines.append(_t("lora.bundled", lang, names=join(a["bundled_embeddings"])))
    triggers = a.get("trigger_words") or []
    if triggers:
        words = join(f"{t['word']} ({_t('trigger.' + t['source'], lang)}{', ' + str(t['count']) if 'count' in t else ''})" for t in triggers)
        lines.append(_t("adapter.triggers", lang, words=words))
    facts = a.get("training_facts") or {}
    trained = [_t(f"train.{k}", lang, value=_fact(facts[k])) for k in TRAINING_SHOWN if k in facts]
    if trained:
        lines.append(_t("adapter.trained", lang, facts=", ".join(trained)))
    network = [_t(f"train.{k}", lang, value=_fact(facts[k])) for k in NETWORK_SHOWN if k in facts]
    if network:
        lines.append(_t("adapter.network", lang, facts=", ".join(network)))
    if facts.get("base_model"):
        lines.append(_t("adapter.trained_on", lang, model=facts["base_model"]))
    return lines


# Which training facts (identify/lora_facts.py TRAINING_KEYS names) the text report shows; --json has them all.
TRAINING_SHOWN = ("steps", "epoch", "epochs", "train_images", "dataset_images", "reg_images", "batch_size", "resolution",
                  "learning_rate", "unet_lr", "text_encoder_lr", "optimizer", "lr_scheduler", "clip_skip", "mixed_precision")
NETWORK_SHOWN = ("network_module", "network_dim", "network_alpha", "network_args")


def _fact(value) -> str:
    if isinstance(value, dict):
        return join(f"{k}={v}" for k, v in value.items())
    text_ = str(value)
    return text_ if len(text_) <= 80 else text_[:77] + "..."


def _embedding_lines(a, lang: str) -> List[str]:
    lines = []
    encoders = join(f"{e['encoder']} {e['width']}" for e in a.get("encoders", [])) or "?"
    lines.append(_t("embedding.vectors", lang, vectors=a.get("vectors"), encoders=encoders))
    if a.get("token"):
        lines.append(_t("embedding.token", lang, token=a["token"]))
    if any(a.get(k) is not None for k in ("name", "step", "sd_checkpoint_name", "sd_checkpoint")):
        ckpt = a.get("sd_checkpoint_name") or "?"
        if a.get("sd_checkpoint"):
            ckpt += f" [{a['sd_checkpoint']}]"
        lines.append(_t("embedding.trained", lang, name=a.get("name") or "?", step=a.get("step", "?"), checkpoint=ckpt))
    return lines


def _yes_no(value, lang: str) -> str:
    if value is None:
        return "?"
    return _t("word.yes" if value else "word.no", lang)


def _hypernetwork_lines(a, lang: str) -> List[str]:
    layers = a.get("layer_sizes") or {}
    sizes = join(f"{w}: {' -> '.join(map(str, s))}" for w, s in layers.items()) if layers else join(a.get("layer_structure") or [])
    lines = [_t("hypernetwork.layers", lang, widths=join(a.get("widths", [])), layers=sizes or "?")]
    lines.append(_t("hypernetwork.options", lang, activation=a.get("activation_func") or "?", layer_norm=_yes_no(a.get("is_layer_norm"), lang),
                    dropout=_yes_no(a.get("use_dropout"), lang), init=a.get("weight_initialization") or "?"))
    if any(a.get(k) is not None for k in ("name", "step", "sd_checkpoint_name")):
        ckpt = a.get("sd_checkpoint_name") or "?"
        if a.get("sd_checkpoint"):
            ckpt += f" [{a['sd_checkpoint']}]"
        lines.append(_t("embedding.trained", lang, name=a.get("name") or "?", step=a.get("step", "?"), checkpoint=ckpt))
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
    for caveat in q.get("caveat_keys") or [{"text": c} for c in q["caveats"]]:
        words = _t(caveat["key"], lang, **caveat["fields"]) if "key" in caveat else caveat["text"]
        lines.append(Text("  ! " + words, style="yellow"))
    return lines
