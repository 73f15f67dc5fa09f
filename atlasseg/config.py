"""One source for settings: dataclasses hold the defaults; dicts, JSON files and command-line flags derive from them.

>>> add_dataclass_args(parser, TrainConfig, prefix="")          # --epochs, --learning-rate, --patch-size Z Y X ...
>>> config = dataclass_from(TrainConfig, json_dict, overrides_from_args(args, TrainConfig))

Nested dataclasses (e.g. ``TrainConfig.augment``) are read from nested dicts; tuples are stored as JSON lists.
Unknown keys are an error that names them, so a typo in a config file never passes silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON-ready values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass inside a hint such as ``AugmentConfig`` or ``AugmentConfig | None``."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def dataclass_from(cls: type, data: dict | None = None, overrides: dict | None = None, where: str = "config"):
    """``cls`` built from ``data`` (nested dicts allowed) updated by ``overrides``; unknown keys are an error."""
    data = {**(data or {}), **(overrides or {})}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        nested = _dataclass_type(hints[key])
        if nested is not None and isinstance(value, dict):
            value = dataclass_from(nested, value, where=f"{where}.{key}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def read_json_config(path: str | Path) -> dict:
    """A JSON config file as a dict; a clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a JSON object")
    return data


# ------------------------------------------------------------------------------------------------------------
# command-line flags


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _scalar(hint: Any) -> tuple[type | None, bool, bool]:
    """(element type, is a tuple/list, is optional) of a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return None, False, optional
        hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if origin in (tuple, list):
        elems = [a for a in args if a is not Ellipsis]
        return (elems[0] if elems else str), True, optional
    if hint in (int, float, str, bool):
        return hint, False, optional
    if hint is dict or origin is dict:
        return dict, False, optional
    return None, False, optional


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
                       skip: tuple[str, ...] = (), help_prefix: str = "", flag_prefix: str | None = None) -> list[str]:
    """Add one flag per plain field of ``cls`` (nested dataclasses are left to ``--config``; dicts take JSON).

    ``prefix`` goes before the destination names (read back by :func:`overrides_from_args` with the same prefix),
    ``flag_prefix`` (default ``prefix``) before the flags: ``--<flag_prefix><field-name>``.

    Defaults are not set on the parser (None = not given), so a flag overrides a config file only when given;
    the help text shows the dataclass default. Returns the field names that got a flag.
    """
    hints = _hints(cls)
    flag_prefix = prefix if flag_prefix is None else flag_prefix
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        elem, many, _ = _scalar(hints[f.name])
        if elem is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{help_prefix}{f.name} (default {to_dict(default)})"
        dest = (prefix + f.name)
        if elem is dict:
            parser.add_argument(_flag(flag_prefix, f.name), dest=dest, type=_json_object, default=None,
                                metavar="JSON", help=help_text + " as a JSON object")
        elif elem is bool:
            parser.add_argument(_flag(flag_prefix, f.name), dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif many:
            parser.add_argument(_flag(flag_prefix, f.name), dest=dest, type=elem, nargs="+", default=None,
                                help=help_text)
        else:
            parser.add_argument(_flag(flag_prefix, f.name), dest=dest, type=elem, default=None, help=help_text)
        added.append(f.name)
    return added


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"channels\": [8, 16, 32]}'")
    return value


def overrides_from_args(args: argparse.Namespace, cls: type, prefix: str = "") -> dict:
    """The flags of :func:`add_dataclass_args` that were given on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out
