"""Every environment variable the app reads, in one place, so a reader finds them all here and
`docs/deployment.md` can list them from one module.

ASSISTANT_ADMIN_TOKEN     the admin token; unset: generated and stored; set empty: admin off
ASSISTANT_OPENAI_API_KEY  the key of the OpenAI-compatible route; unset: the route is off
ASSISTANT_DATA_DIR        the default --data-dir (data/)
"""

from __future__ import annotations

import os
from pathlib import Path

ADMIN_TOKEN = "ASSISTANT_ADMIN_TOKEN"
OPENAI_API_KEY = "ASSISTANT_OPENAI_API_KEY"
DATA_DIR = "ASSISTANT_DATA_DIR"


def admin_token() -> str:
    """The admin token this process checks against; '' when admin actions are off."""
    return os.environ.get(ADMIN_TOKEN, "")


def admin_token_chosen() -> bool:
    """Did the operator set the variable (even to '', which turns admin off)?"""
    return ADMIN_TOKEN in os.environ


def use_admin_token(token: str) -> None:
    """Make a generated token this process's admin token (the app's checks read it here)."""
    os.environ[ADMIN_TOKEN] = token


def openai_api_key() -> str:
    return os.environ.get(OPENAI_API_KEY, "")


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR, "data")).expanduser()
