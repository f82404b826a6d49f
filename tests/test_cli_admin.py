"""The CLI's admin commands on the database file when no app runs, and through the app's admin
API when one holds the file (`assistant.cli.admin_client`), without starting vLLM: a second
process holds the real DuckDB file and a small HTTP server answers as the app's routes do. The
real app's side of these routes is tested in test_retrain_api.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from assistant.cli import main
from assistant.cli.admin_client import LocalAdmin, RemoteAdmin, admin_client
from assistant.config import AppConfig
from storage import Store

ROWS = [
    {"version": "v0001", "status": "serving", "parent": "v0000", "created_at": "2026-01-01T00:00"},
    {"version": "v0000", "status": "previous", "parent": None, "created_at": "2026-01-01T00:00"},
]
EVENTS = [
    ("progress", 1, {"stage": "ppo", "step": 0, "max_steps": 2, "reward_mean": 0.5, "kl": 0.1}),
    ("result", 2, {"status": "rejected", "version": "v0002", "gate": {"reason": "not better"}}),
]


class FakeApp(BaseHTTPRequestHandler):
    """The app's admin routes, answering as `assistant.api` does; it notes who asked."""

    seen: list[tuple[str, str, str | None]] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self, body: dict | str, kind: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path == "/api/versions":
            self._answer({"serving": "v0001", "versions": ROWS})
        elif self.path == "/api/retrain/r7/events":
            stream = "".join(
                f"event: {kind}\nid: {n}\ndata: {json.dumps(data)}\n\n" for kind, n, data in EVENTS
            )
            self._answer(": keep-alive\n\n" + stream, "text/event-stream")

    def do_POST(self) -> None:
        self.seen.append(("POST", self.path, self.headers.get("Authorization")))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or "{}")
        if self.path == "/api/retrain":
            self._answer({"run_id": "r7"})
        elif self.path == "/api/rollback":
            self._answer({"version": body["version"], "swap_seconds": 0.25})


@pytest.fixture
def data(tmp_path):
    store = Store(tmp_path / "assistant.duckdb")
    store.ensure_base_version("v0000", str(tmp_path / "base"), {"model": "base"})
    store.close()
    return tmp_path


@pytest.fixture
def app_holding_the_db(data, monkeypatch) -> Iterator[str]:
    """The URL of a fake app, while another process holds the database as the app would."""
    code = "import sys, time; from storage import Store; Store(sys.argv[1]); print(1, flush=True)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code + "; time.sleep(300)", str(data / "assistant.duckdb")],
        stdout=subprocess.PIPE,
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("ASSISTANT_ADMIN_TOKEN", raising=False)
    FakeApp.seen = []
    try:
        assert holder.stdout.readline().strip() == b"1"
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        holder.kill()
        holder.wait()


def test_without_an_app_the_cli_works_on_the_file(data, capsys):
    assert isinstance(admin_client(AppConfig(data_dir=data), "http://nowhere", None), LocalAdmin)
    assert main(["rollback", "v0000", "--data-dir", str(data)]) == 0
    assert "v0000 will be served at the next start (no app is running)" in capsys.readouterr().out


def test_while_an_app_holds_the_db_the_cli_asks_it_with_the_stored_token(
    data, app_holding_the_db, capsys
):
    (data / "secrets").mkdir()
    (data / "secrets" / "admin-token").write_text("stored-token\n")
    url = app_holding_the_db
    admin = admin_client(AppConfig(data_dir=data), url, None)
    assert isinstance(admin, RemoteAdmin)

    assert main(["rollback", "v0000", "--data-dir", str(data), "--url", url]) == 0
    out, err = capsys.readouterr()
    assert out == "serving v0000 (swap 0.25 s)\n"
    assert f"the database is in use by the running app; asking it at {url}" in err

    assert main(["versions", "--data-dir", str(data), "--url", url, "--token", "given"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["v0001", "serving"], ["v0000", "previous"]]

    assert main(["retrain", "--data-dir", str(data), "--url", url]) == 0  # rejected: exit 0
    out, err = capsys.readouterr()
    assert "cycle r7 started" in err and "reward +0.500 KL 0.100" in err
    assert "status: rejected" in out and "gate: not better" in out

    assert FakeApp.seen == [
        ("POST", "/api/rollback", "Bearer stored-token"),
        ("GET", "/api/versions", "Bearer given"),
        ("POST", "/api/retrain", "Bearer stored-token"),
        ("GET", "/api/retrain/r7/events", "Bearer stored-token"),
    ]
    # settings the running app would ignore are refused before asking it anything
    assert main(["retrain", "--retrain-preset", "fast", "--data-dir", str(data), "--url", url]) == 2
    assert "retrains with the settings it was started with" in capsys.readouterr().err
    assert len(FakeApp.seen) == 4
