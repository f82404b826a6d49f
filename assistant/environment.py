"""Every environment variable the app reads, in one place, so a reader finds them all here and
`docs/deployment.md` can list them from one module.

ASSISTANT_ADMIN_TOKEN     the admin token; unset: generated and stored; set empty: admin off
ASSISTANT_OPENAI_API_KEY  the key of the OpenAI-compatible route; unset: the route is off
ASSISTANT_DATA_DIR        the default --data-dir (data/)
ASSISTANT_DATABASE_URL    the default --db: a postgresql:// URL (several app processes on one
                          database); unset: the DuckDB file in the data directory

and what it sets: GRADIO_ANALYTICS_ENABLED (off unless chosen). The embedded engine's process
gets VLLM_SERVER_DEV_MODE, VLLM_ALLOW_RUNTIME_LORA_UPDATING and VLLM_CPU_KVCACHE_SPACE on top of
`child_environment` (`engine.vllm_server.engine_environment`), each unless already set.
The processes the app starts (the engine, the retrain worker) get none of the three secrets: they
never check a token or a key or open the database, and a child's environment is readable in
/proc and lands in crash reports.
The retrain worker's trackers read their own (WANDB_API_KEY, WANDB_MODE, MLFLOW_TRACKING_URI,
TRACKIO_DIR, ...): alignment/tracking.py.
"""

from __future__ import annotations

import os
from pathlib import Path

ADMIN_TOKEN = "ASSISTANT_ADMIN_TOKEN"
OPENAI_API_KEY = "ASSISTANT_OPENAI_API_KEY"
DATA_DIR = "ASSISTANT_DATA_DIR"
DATABASE_URL = "ASSISTANT_DATABASE_URL"
SECRETS = (ADMIN_TOKEN, OPENAI_API_KEY, DATABASE_URL)  # a database URL may hold a password


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


def database_url() -> str | None:
    return os.environ.get(DATABASE_URL) or None


def turn_off_gradio_analytics() -> None:
    """The page phones home by default; an operator who wants it sets the variable."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def child_environment() -> dict[str, str]:
    """This process's environment without the app's secrets, for the processes it starts."""
    return {k: v for k, v in os.environ.items() if k not in SECRETS}
