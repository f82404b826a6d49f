"""What every typed configuration dataclass shares: a field with its help text, and values from a
file or a flag checked against the field's type.

The app's (`assistant.config`), the engine's (`engine.config`) and the retrain cycle's
(`alignment.config`) dataclasses all use these; it lives in the bottom package so each of them can
import it without an upward import. It knows nothing of any particular setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


def setting(text: str, **kwargs) -> Any:
    """A dataclass field with a one-line help (what `--help` and the docs show)."""
    return dataclasses.field(metadata={"help": text}, **kwargs)


def updated(instance: Any, values: Any, where: str = "") -> Any:
    """A copy of the dataclass `instance` with the fields `values` names set, each checked against
    its annotation; a field that is itself a dataclass takes a mapping of its own fields, so the
    fields it does not name keep their values. An unknown name or a wrong type raises ValueError
    naming the entry (`where` prefixes the names, e.g. "serve")."""
    if not isinstance(values, dict):
        what = repr(where) if where else "the settings"
        raise ValueError(f"{what} must be a mapping of settings, got {values!r}")
    kinds = typing.get_type_hints(type(instance))
    known = {f.name for f in dataclasses.fields(instance)}
    changes = {}
    for name, value in values.items():
        entry = f"{where}.{name}" if where else name
        if name not in known:
            raise ValueError(f"unknown setting {entry}; use {', '.join(sorted(known))}")
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current):
            changes[name] = updated(current, value, entry)
        else:
            changes[name] = typed(entry, value, kinds[name])
    return dataclasses.replace(instance, **changes)


def typed(name: str, value: Any, kind: Any) -> Any:
    """`value` as a field annotated `kind` holds it (an int where a float goes, a str where a
    Path goes), or ValueError naming the entry; bool is never taken for a number."""
    if _fits(value, kind):
        return _converted(value, kind)
    raise ValueError(f"{name} must be {_kind_name(kind)}, got {value!r}")


def _options(kind: Any) -> tuple:
    return typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)


def _fits(value: Any, kind: Any) -> bool:
    for option in _options(kind):
        if option is type(None):
            if value is None:
                return True
        elif typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            if isinstance(value, list) and all(_fits(v, item) for v in value):
                return True
            if not isinstance(value, list) and _fits(value, item):
                return True  # one value where a list goes: a list of one
        elif option is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return True
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif option is Path:
            if isinstance(value, str | Path):
                return True
        elif isinstance(value, option):
            return True
    return False


def _converted(value: Any, kind: Any) -> Any:
    options = _options(kind)
    if value is None:
        return None
    if not isinstance(value, list) and not any(_fits(value, o) for o in options if not _listed(o)):
        return [_converted(value, typing.get_args(next(o for o in options if _listed(o)))[0])]
    if float in options and not isinstance(value, str):
        return float(value)
    if Path in options:
        return Path(value).expanduser()
    return list(value) if isinstance(value, list) else value


def _listed(kind: Any) -> bool:
    return typing.get_origin(kind) is list


def _kind_name(kind: Any) -> str:
    names = []
    for option in _options(kind):
        if option is type(None):
            names.append("null")
        elif typing.get_origin(option) is not None:  # list[str]
            names.append(str(option))
        else:
            names.append(option.__name__ if isinstance(option, type) else str(option))
    return " or ".join(names)
