"""`assistant run` and `assistant provision`: the app and its embedded model."""

from __future__ import annotations

import argparse

from assistant.config import AppConfig


def cmd_run(args: argparse.Namespace, config: AppConfig) -> int:
    from assistant.server import serve

    config.validate()  # once, before anything starts; the cycle's settings resolved
    serve(config)
    return 0


def cmd_provision(args: argparse.Namespace, config: AppConfig) -> int:
    from engine.provision import provision_embedded

    print(provision_embedded(config.data_dir))
    return 0
