"""`assistant run --config FILE`: every `run` and retrain setting in one YAML file.

The file mirrors the config dataclasses: top-level `data_dir`, `db`, `retrain_preset`, the
sections `engine`, `serve`, `sampling`, `loop`, `cai` with their field names, and `retrain` with
the cycle's sections (`reward`, `ppo`, `gate`, `sft`), as `--retrain-config` takes them.
Command-line flags override the file. An unknown key or a wrong type is refused at start-up,
naming the entry, like `--retrain-config` (a typo must not be silently ignored).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from assistant.config import SECTIONS, AppConfig, ConfigError

TOP_LEVEL = {"data_dir", "db", "retrain_preset", "retrain", *SECTIONS}


def load_config_file(path: Path) -> AppConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the file must be a mapping of settings")
    config = AppConfig()
    for key, value in data.items():
        if key not in TOP_LEVEL:
            raise ConfigError(
                f"--config {path}: unknown setting {key!r}; use {', '.join(sorted(TOP_LEVEL))}"
            )
        if key in SECTIONS:
            _apply_section(path, key, value, getattr(config, key))
        elif key == "retrain":
            if not isinstance(value, dict):
                raise ConfigError(f"--config {path}: 'retrain' must be a mapping of sections")
            config.retrain_settings = value
        elif key == "retrain_preset":
            config.retrain_preset = _typed(path, key, value, "str")
        elif key == "data_dir":
            config.data_dir = Path(_typed(path, key, value, "str")).expanduser()
        elif key == "db":
            config.db_path = Path(_typed(path, key, value, "str")).expanduser()
    config.retrain_overrides()  # the retrain section is checked now, not mid-cycle
    return config


def _apply_section(path: Path, section: str, values: Any, target: Any) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: {section!r} must be a mapping of settings")
    known = {f.name: str(f.type) for f in fields(target)}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(
                f"--config {path}: unknown setting {section}.{name}; use {', '.join(sorted(known))}"
            )
        setattr(target, name, _typed(path, f"{section}.{name}", value, known[name]))


def _typed(path: Path, name: str, value: Any, kind: str) -> Any:
    """`kind` is the dataclass field's annotation, as written."""
    optional = "None" in kind
    base = kind.replace("| None", "").strip()
    if value is None and optional:
        return None
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "Path": isinstance(value, str),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(base, False)
    if not ok:
        raise ConfigError(f"--config {path}: {name} must be {base}, got {value!r}")
    if base == "float":
        return float(value)
    if base == "Path":
        return Path(value).expanduser()
    return list(value) if base == "list[str]" else value
