"""`assistant run --config FILE`: every `run` and retrain setting in one YAML file.

The file mirrors the config dataclasses: top-level `data_dir`, `db`, `retrain_preset`, the
sections `engine`, `serve`, `sampling`, `loop`, `cai` with their field names, and `retrain` with
the cycle's sections (`reward`, `ppo`, `gate`, `sft`), as `--retrain-config` takes them.
Command-line flags override the file. An unknown key or a wrong type is refused at start-up,
naming the entry, like `--retrain-config` (a typo must not be silently ignored).
"""

from __future__ import annotations

from pathlib import Path

from assistant.config import SECTIONS, AppConfig, ConfigError, database_location
from storage.settings import typed, updated

TOP_LEVEL = {"data_dir", "db", "retrain_preset", "retrain", *SECTIONS}


def load_config_file(path: Path) -> AppConfig:
    """The file's settings over the defaults. Its `retrain` section is kept as it is: the cycle's
    settings are resolved, and checked, once with the others (`AppConfig.validate`)."""
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
        try:
            if key in SECTIONS:
                setattr(config, key, updated(getattr(config, key), value, key))
            elif key == "retrain":
                if not isinstance(value, dict):
                    raise ValueError("'retrain' must be a mapping of sections")
                config.retrain_settings = value
            elif key == "retrain_preset":
                config.retrain_preset = typed(key, value, str)
            elif key == "data_dir":
                config.data_dir = typed(key, value, Path)
            elif key == "db":
                config.db_path = database_location(typed(key, value, str))
        except ValueError as exc:
            raise ConfigError(f"--config {path}: {exc}") from exc
    return config
