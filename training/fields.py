"""Typed dataclass fields from the command line: `FIELD=VALUE` parsed against the field's type,
types checked whatever the source (flag, preset file, config.json), and every field listed with
its documentation. Torch-free: `mu train` and `mu serve --finetune-set` both use it."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any

from controller.errors import UsageError


def field_types(cls: type) -> dict[str, Any]:
    """{name: type} of the dataclass `cls` (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    plain = isinstance(tp, type) and not typing.get_args(tp)
    return tp.__name__ if plain else str(tp).replace("typing.", "")


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp: Any, value: Any) -> Any:
    """`value` (from JSON or text) as a `tp` scalar; raises UsageError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise UsageError("expects true or false")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError("expects an integer")
        if isinstance(value, int):
            return value
        try:
            x = float(str(value).replace("_", ""))
        except ValueError:
            raise UsageError("expects an integer") from None
        if not (math.isfinite(x) and x.is_integer()):
            raise UsageError("expects an integer")
        return int(x)
    if tp is float:
        if isinstance(value, bool):
            raise UsageError("expects a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError("expects a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise UsageError("expects a string")
        return value
    return value  # a type this parser does not know (Path and the like): the class checks it


def coerce(tp: Any, value: Any) -> Any:
    """`value` as type `tp` (bool, int, float, str, list of those, optional); raises UsageError
    saying what the type expects."""
    inner, nullable = _optional(tp)
    if value is None or (nullable and isinstance(value, str) and value.lower() in ("none", "null")):
        if nullable:
            return None
        raise UsageError(f"expects {type_name(tp)}, not none")
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list):
            raise UsageError(f"expects a list like [{type_name(item)}, ...]")
        try:
            return [_scalar(item, v) for v in value]
        except UsageError:
            raise UsageError(f"expects a list of {type_name(item)}") from None
    return _scalar(inner, value)


def parse_text(tp: Any, text: str) -> Any:
    """A command-line value: JSON where it parses (numbers, lists), the text otherwise."""
    inner, _ = _optional(tp)
    if inner is str:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return coerce(tp, value)


def unknown_field(name: str, names: list[str], where: str) -> UsageError:
    """The error for a field name that is not one: with "did you mean" for a near miss."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UsageError(f"{where}: no field {name!r}{hint} (list them with --list-fields)")


def parse_sets(
    cls: type, items: list[str], flag: str, exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`FIELD=VALUE` items onto {field: typed value} of the dataclass `cls`. Raises UsageError."""
    hints = {k: v for k, v in field_types(cls).items() if k not in exclude}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"{flag} {item!r}: expected FIELD=VALUE")
        if key not in hints:
            if key in exclude:
                raise UsageError(f"{flag} {key}: it has a flag of its own")
            raise unknown_field(key, sorted(hints), f"{flag} {item!r}")
        try:
            out[key] = parse_text(hints[key], value)
        except UsageError as err:
            raise UsageError(f"{flag} {item!r}: {key} {err}") from None
    return out


def check_types(obj: Any) -> None:
    """Coerce every field of the dataclass instance `obj` to its declared type (ints where a
    float is declared become floats); raises UsageError naming each field that does not fit."""
    errors = []
    for name, tp in field_types(type(obj)).items():
        try:
            setattr(obj, name, coerce(tp, getattr(obj, name)))
        except UsageError as err:
            errors.append(f"{name} {err} (got {getattr(obj, name)!r})")
    if errors:
        raise UsageError(f"invalid {type(obj).__name__}: " + "; ".join(errors))


def describe_fields(cls: type) -> str:
    """Every field of `cls`: name, type, default and the help written beside it."""
    lines = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        default = json.dumps(default, default=str)
        lines.append(f"{f.name} ({type_name(hints[f.name])}, default {default})")
        lines.append(f"    {f.metadata.get('help', '')}")
    return "\n".join(lines)
