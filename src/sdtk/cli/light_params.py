"""Start-up: coerce plain str/Path/bool command-line values without importing pydantic.

Typer 0.2x coerces every parameter value through a pydantic `TypeAdapter`; importing pydantic
costs about 0.1 s, most of sdtk's 0.25 s start-up budget, for values that are already strings
(or bools) from the parser. For the annotations below the result is the same as pydantic's lax
mode gives (`str` unchanged, `Path(value)`, a list of those, `None`/`()` when absent); every other
annotation (int, float, choices, ranges...) keeps typer's own coercion. Typer versions without
this machinery (older ones coerce through click types, which is cheap) are left alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Union, get_args, get_origin

_PLAIN = {str: str, Path: Path}


def _leaf(annotation: Any):
    """The converter for str/Path/bool, Optional[...] of them; None for anything else."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    if annotation is bool:
        return bool
    return _PLAIN.get(annotation)


def converter_for(annotation: Any):
    """(convert, is_list) for the simple annotations, or None to let typer coerce."""
    leaf = _leaf(annotation)
    if leaf is not None:
        return leaf, False
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    if get_origin(annotation) in (list, List):
        (item,) = get_args(annotation) or (None,)
        leaf = _leaf(item)
        if leaf is not None and leaf is not bool:
            return leaf, True
    return None


def install() -> bool:
    """Route simple parameters around pydantic; True when typer's coercion layer was patched."""
    try:
        import typer.core as core
        from typer._coercion import RuntimeParam
    except ImportError:
        return False
    original = getattr(core, "build_runtime_param", None)
    if original is None or getattr(original, "_sdtk_light", False):
        return False

    class LightRuntimeParam(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            convert, is_list = converter_for(self.annotation)
            if isinstance(value, bool) and convert is bool:
                return value
            if is_list:
                return [v if isinstance(v, convert) else convert(v) for v in value]
            if isinstance(value, (str, Path)) and convert in (str, Path):
                return convert(value)
            return original(self._descriptor)._coerce_value(value, param=param, ctx=ctx)

    def build(descriptor: Any):
        info = descriptor.parameter_info
        simple = (descriptor.file_annotation is None and converter_for(descriptor.annotation) is not None
                  and not descriptor.is_choice and getattr(info, "parser", None) is None
                  and getattr(info, "click_type", None) is None)
        for flag in ("exists", "resolve_path", "writable"):
            simple = simple and not getattr(info, flag, False)
        if not simple:
            return original(descriptor)
        light = LightRuntimeParam(parameter_info=info, annotation=descriptor.annotation)
        object.__setattr__(light, "_descriptor", descriptor)
        return light

    build._sdtk_light = True
    core.build_runtime_param = build
    return True

