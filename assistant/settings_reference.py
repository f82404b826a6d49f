"""docs/settings.md, written from the configuration dataclasses themselves: every setting with its
type, default, help and flag, so the reference cannot drift from the code.

Regenerate with `.venv/bin/python -m assistant.settings_reference > docs/settings.md`; the test
suite fails while the file differs from what this writes (tests/test_config_cli.py).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import PurePath

from alignment.config import CycleConfig
from assistant.cli.parser import RETRAIN_FLAGS, RUN_OPTIONS
from assistant.config import SECTIONS, AppConfig

HEADER = """# Settings reference

Back to the [README](../README.md). Written from the code by `python -m
assistant.settings_reference` (a test fails while this file differs from it): every setting,
its type, its default, what it does, and its `assistant run` flag where it has one. In a
`--config FILE` (YAML) each table is a section (`engine:`, `serve:`, ...) with these names; the
cycle's settings go under `retrain:` by section (`retrain: {ppo: {steps: 16}}`), or in a
`--retrain-config` JSON file. Flags win over `--retrain-config`, which wins over the YAML file.
"""


def _type(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return str(text or annotation).replace("typing.", "")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(a section)"
    else:
        return "(required)"
    if value is None:
        return "`None`"
    shown = str(value) if isinstance(value, PurePath) else repr(value)
    return f"`{shown}`".replace("|", "\\|")


def _table(cls: type, flags: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = [
        "| setting | type | default | flag | what it does |",
        "|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or dataclasses.is_dataclass(hints.get(f.name)):
            continue  # internal, or a nested section (its own table)
        doc = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        flag = f"`{flags[f.name]}`" if f.name in flags else ""
        kind = _type(f.type).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {kind} | {_default(f)} | {flag} | {doc} |")
    return rows


def render() -> str:
    run_flags: dict[str, dict[str, str]] = {}
    for flag, section, name in RUN_OPTIONS:
        run_flags.setdefault(section, {})[name] = flag
    cycle_flags: dict[str, dict[str, str]] = {}
    for dest, entry in RETRAIN_FLAGS.items():
        *section, name = entry.split(".")
        cycle_flags.setdefault(".".join(section), {})[name] = "--" + dest.replace("_", "-")
    lines = [HEADER, "## The app (`assistant run`)", ""]
    lines += _table(AppConfig, {"data_dir": "--data-dir", "db_path": "--db"}) + [""]
    for section, cls in SECTIONS.items():
        lines += [f"### `{section}`", "", *_table(cls, run_flags.get(section, {})), ""]
    lines += ["## A retrain cycle (`retrain:` in the YAML file, or `--retrain-config`)", ""]
    lines += _table(CycleConfig, cycle_flags.get("", {})) + [""]
    for f in dataclasses.fields(CycleConfig):
        cls = typing.get_type_hints(CycleConfig)[f.name]
        if dataclasses.is_dataclass(cls):
            lines += [f"### `{f.name}`", "", *_table(cls, cycle_flags.get(f.name, {})), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
