"""The whole app in this process around a `FakeEngine`, talked to through Starlette's test client.

The edge's rules (statuses, limits, sessions, cookies, validation, what is stored, deletion, host
names, admin sign-in, body limits) do not depend on a real model or a real process, so tests of
them build the app with `build_app(config, runtime)` from `assistant run`'s own flags and call it
in milliseconds. What only a real process or engine shows (replies streaming, SIGKILL and restart,
uvicorn's handling of X-Forwarded-For, real vLLM) stays with `harness.app_process.AppProcess`.

    with in_process_app(tmp_path, "--max-backlog", "1") as client:
        client.post("/api/chat", json={"message": "hi"})

The client acts like the module-level `httpx` calls the process tests make: it keeps no cookies
and follows no redirects, so each request carries only what the test gives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path

import pytest

from harness.app_process import ADMIN_TOKEN, tiny_app_flags
from harness.fake_engine import FakeEngine

BASE_URL = "http://127.0.0.1"  # a host name the app allows by default
CLIENT_PORT = 50000


class _KeepNoCookies(DefaultCookiePolicy):
    def set_ok(self, cookie, request) -> bool:
        return False


def _client(app, address: str):
    from starlette.testclient import TestClient

    client = TestClient(
        app, base_url=BASE_URL, follow_redirects=False, client=(address, CLIENT_PORT)
    )
    client.cookies = CookieJar(policy=_KeepNoCookies())
    return client


@contextmanager
def in_process_app(
    data_dir: Path, *flags: str, engine: FakeEngine | None = None, address: str = "127.0.0.1"
) -> Iterator:
    """`assistant run --data-dir DATA_DIR` with the shared tiny apps' flags and then `flags`
    (the last given wins), around `engine` (a new `FakeEngine` unless given), as a test client
    connecting from `address`; its lifespan runs while the block does, with the admin token
    `ADMIN_TOKEN`. The app, its runtime and the engine: `client.app.state.runtime`."""
    from assistant.cli import build_parser, config_from_args
    from assistant.server import build_app, open_runtime

    args = build_parser().parse_args(
        ["run", "--data-dir", str(data_dir), *tiny_app_flags(), *flags]
    )
    config = config_from_args(args).validate()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASSISTANT_ADMIN_TOKEN", ADMIN_TOKEN)
        app = build_app(config, open_runtime(config, engine=engine or FakeEngine()))
        with _client(app, address) as client:
            yield client


def from_address(client, address: str):
    """Another client of the app `client` runs, connecting from `address` (someone else, to
    the limits per address); it shares the app's event loop and starts no second lifespan."""
    other = _client(client.app, address)
    other.portal = client.portal
    return other


def new_session(client) -> dict[str, str]:
    """Headers carrying a session the app issued (`POST /api/session`), as
    `AppProcess.new_session`."""
    r = client.post("/api/session")
    assert r.status_code == 200, r.text
    return {"X-Session-Id": r.json()["session_id"]}


ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def export(client, fmt: str = "trl"):
    """`GET /api/export` as the operator, as `AppProcess.export`."""
    return client.get("/api/export", params={"format": fmt}, headers=ADMIN_HEADERS)
