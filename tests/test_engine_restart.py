"""The embedded engine process dies: the app reports it, restarts it, and serves again."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import httpx
import psutil

from harness.app_process import AppProcess

SECRET_KEY = "openai-key-for-the-app-only"


def assert_no_secrets_below(app: AppProcess) -> None:
    """No process the app started (the engine, its core) holds the admin token or the OpenAI
    key in its environment (/proc/PID/environ): they never check either."""
    token = (app.data_dir / "secrets" / "admin-token").read_text().strip()
    children = psutil.Process(app.proc.pid).children(recursive=True)
    assert children
    for child in children:
        environ = Path(f"/proc/{child.pid}/environ").read_bytes()
        assert b"ASSISTANT_ADMIN_TOKEN" not in environ and token.encode() not in environ
        assert b"ASSISTANT_OPENAI_API_KEY" not in environ and SECRET_KEY.encode() not in environ


def test_app_restarts_a_dead_engine_and_says_so(tiny_model_dir, tmp_path):
    app = AppProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--max-model-len",
            "512",
            "--max-new-tokens",
            "8",
            "--no-cai",
        ],
        tmp_path / "app",
        # the key from the environment, the admin token generated and stored by the app
        env={"ASSISTANT_OPENAI_API_KEY": SECRET_KEY},
    ).start(timeout=300)
    try:
        assert (
            httpx.post(app.url + "/api/chat", json={"message": "before"}, timeout=60).status_code
            == 200
        )
        engines = [
            p
            for p in psutil.Process(app.proc.pid).children(recursive=True)
            if "vllm.entrypoints" in " ".join(p.cmdline())
        ]
        assert engines, "no engine process under the app"
        # it listens on a Unix socket in a directory only this user can enter, on no TCP port
        cmdline = engines[0].cmdline()
        assert "--uds" in cmdline and "--port" not in cmdline
        socket_dir = Path(cmdline[cmdline.index("--uds") + 1]).parent
        assert_no_secrets_below(app)
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        # vLLM's own IPC sockets are in there too, not left in /tmp
        assert any(p.is_socket() and p.name != "engine.sock" for p in socket_dir.iterdir())
        os.killpg(engines[0].pid, signal.SIGKILL)  # the engine and its core die at once

        seen_note, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline:
            health = httpx.get(app.url + "/api/health", timeout=10)
            if seen_note is None and health.status_code == 503 and health.json().get("note"):
                # Right after the watcher noticed, the restart has ~20 s to go: chats get a
                # clear "retry" answer, not a hang or a 500.
                seen_note = health.json()["note"]
                busy = httpx.post(app.url + "/api/chat", json={"message": "during"}, timeout=60)
                assert busy.status_code == 503, busy.text
                assert "restarting" in busy.json()["error"] and busy.headers["retry-after"]
            if seen_note and health.status_code == 200:
                break
            time.sleep(0.5)
        assert seen_note and "restarting" in seen_note
        assert httpx.get(app.url + "/api/health").json()["status"] == "ok"
        after = httpx.post(app.url + "/api/chat", json={"message": "after"}, timeout=60)
        assert after.status_code == 200 and after.json()["model_version"] == "v0000"
        assert_no_secrets_below(app)  # the restarted engine too, started after the token was made
    finally:
        app.stop()
    assert not socket_dir.exists(), list(socket_dir.iterdir())  # nothing left behind


def test_engine_does_not_outlive_a_killed_app(tiny_model_dir, tmp_path):
    app = AppProcess(
        ["--model", str(tiny_model_dir), "--max-model-len", "512", "--no-cai"], tmp_path / "app"
    ).start(timeout=300)
    engines = [
        p
        for p in psutil.Process(app.proc.pid).children(recursive=True)
        if "vllm.entrypoints" in " ".join(p.cmdline())
    ]
    assert engines
    app.stop(signal.SIGKILL)
    gone, alive = psutil.wait_procs(engines, timeout=60)
    for p in alive:  # leave nothing behind even if the assertion below fails
        p.kill()
    assert not alive, "the engine outlived the app"
