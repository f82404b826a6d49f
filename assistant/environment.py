"""Every environment variable the app reads, in one place, so a reader finds them all here and
`docs/deployment.md` can list them from one module.

ASSISTANT_ADMIN_TOKEN     the admin token; unset: generated and stored; set empty: admin off
ASSISTANT_OPENAI_API_KEY  the key of the OpenAI-compatible route; unset: the route is off
ASSISTANT_DATA_DIR        the default --data-dir (data/)

and what it sets: GRADIO_ANALYTICS_ENABLED (off unless chosen), and for the embedded engine's
process VLLM_SERVER_DEV_MODE and VLLM_ALLOW_RUNTIME_LORA_UPDATING (the hot swap and on-policy
rollouts need them) and VLLM_CPU_KVCACHE_SPACE (from --kv-cache-gib), each unless already set.
The processes the app starts (the engine, the retrain worker) get neither secret: they never check
a token or a key, and a child's environment is readable in /proc and lands in crash reports.
"""

from __future__ import annotations

import os
from pathlib import Path

ADMIN_TOKEN = "ASSISTANT_ADMIN_TOKEN"
OPENAI_API_KEY = "ASSISTANT_OPENAI_API_KEY"
DATA_DIR = "ASSISTANT_DATA_DIR"
SECRETS = (ADMIN_TOKEN, OPENAI_API_KEY)


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


def turn_off_gradio_analytics() -> None:
    """The page phones home by default; an operator who wants it sets the variable."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def child_environment() -> dict[str, str]:
    """This process's environment without the app's secrets, for the processes it starts."""
    return {k: v for k, v in os.environ.items() if k not in SECRETS}


def engine_environment(kv_cache_gib: int | None) -> dict[str, str]:
    """The environment of the embedded vLLM process: the app's (without its secrets), plus what
    the app needs of vLLM (an operator's own setting of any of them wins). `kv_cache_gib`: on a
    CPU only."""
    env = child_environment()
    # Weight hot-swap needs the dev endpoints (/collective_rpc, /reset_prefix_cache), which
    # listen on a private socket; on-policy rollouts load the PPO adapter at runtime.
    env.setdefault("VLLM_SERVER_DEV_MODE", "1")
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    if kv_cache_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return env
