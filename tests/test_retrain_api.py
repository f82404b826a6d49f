"""Retrain, deploy and roll back through the running app's API (tiny model, real engine)."""

from __future__ import annotations

import httpx

TOKEN = "s3cret-token"


def post(app, route, body=None, token=TOKEN, timeout=600):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{app.url}/api/{route}", json=body or {}, headers=headers, timeout=timeout)


def test_admin_routes_refuse_when_the_token_is_set_empty(tiny_app_factory, monkeypatch):
    # started with ASSISTANT_ADMIN_TOKEN set but empty: admin actions are off, chat stays open
    # (unset, a token is generated: test_config_cli.py)
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "")
    app = tiny_app_factory()
    resp = post(app, "retrain")
    assert resp.status_code == 403 and "ASSISTANT_ADMIN_TOKEN" in resp.json()["error"]
    assert post(app, "rollback", {"version": "v0000"}).status_code == 403
    assert httpx.get(app.url + "/api/export").status_code == 403


def test_retrain_deploys_new_version_then_rollback(tiny_app_factory, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    assert post(app, "retrain", token=None).status_code == 401
    assert post(app, "retrain", token="wrong").status_code == 401
    assert post(app, "retrain").status_code == 409  # no votes yet: nothing to learn from

    for i in range(6):
        turn = httpx.post(
            app.url + "/api/chat", json={"message": f"question {i}?"}, timeout=120
        ).json()
        httpx.post(
            app.url + "/api/vote",
            json={"pair_id": turn["pair_id"], "choice": "ab"[i % 2]},
            timeout=30,
        )

    result = post(app, "retrain")
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["status"] == "deployed" and body["version"] == "v0001", body
    assert body["swap_seconds"] > 0 and body["reward"]["n_train"] > 0

    versions = httpx.get(app.url + "/api/versions").json()
    assert versions["serving"] == "v0001"
    status = {v["version"]: v["status"] for v in versions["versions"]}
    assert status == {"v0000": "previous", "v0001": "serving"}
    turn = httpx.post(app.url + "/api/chat", json={"message": "after the swap"}, timeout=120).json()
    assert turn["model_version"] == "v0001"  # later candidates are logged with the new version

    back = post(app, "rollback", {"version": "v0000"})
    assert back.status_code == 200 and back.json()["version"] == "v0000"
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    assert post(app, "rollback", {"version": "v0999"}).status_code == 404
    assert post(app, "rollback", {"version": 3}).status_code == 422


def _vote_some(app, n=4):
    for i in range(n):
        turn = httpx.post(app.url + "/api/chat", json={"message": f"q{i}"}, timeout=120).json()
        httpx.post(
            app.url + "/api/vote",
            json={"pair_id": turn["pair_id"], "choice": "ab"[i % 2]},
            timeout=30,
        )


def test_killed_cycle_is_marked_failed_and_serving_continues(
    tiny_app_factory, tiny_model_dir, monkeypatch
):
    import threading
    import time
    from pathlib import Path

    import psutil

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("ASSISTANT_OPENAI_API_KEY", "openai-key")
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    _vote_some(app)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(resp=post(app, "retrain")))
    thread.start()
    worker = None
    deadline = time.monotonic() + 60
    while worker is None and time.monotonic() < deadline:
        worker = next(
            (
                p
                for p in psutil.Process(app.proc.pid).children()  # this app's, not another's
                if "alignment.worker" in " ".join(p.cmdline())
            ),
            None,
        )
        time.sleep(0.1)
    assert worker is not None, "the cycle never started its worker process"
    # the worker checks no token and no key: it does not hold them (/proc/PID/environ)
    environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
    for secret in (b"ASSISTANT_ADMIN_TOKEN", TOKEN.encode(), b"ASSISTANT_OPENAI", b"openai-key"):
        assert secret not in environ, secret
    time.sleep(1.0)
    worker.kill()  # kill -9 mid-cycle
    thread.join(timeout=120)
    body = result["resp"].json()
    assert body["status"] == "failed", body
    # Serving is untouched: same version, chat still works.
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    turn = httpx.post(app.url + "/api/chat", json={"message": "still here?"}, timeout=120)
    assert turn.status_code == 200 and turn.json()["model_version"] == "v0000"
    httpx.post(app.url + "/api/vote", json={"pair_id": turn.json()["pair_id"], "choice": "a"})
    # The next cycle works.
    again = post(app, "retrain").json()
    assert again["status"] == "deployed", again
    post(app, "rollback", {"version": "v0000"})  # leave the shared engine on the base weights


def test_app_killed_mid_cycle_takes_its_worker_along_and_restart_marks_the_run_failed(
    tiny_app_factory, tiny_model_dir, monkeypatch, tmp_path
):
    import contextlib
    import json
    import signal
    import threading
    import time

    import duckdb
    import psutil

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    data = tmp_path / "killed"
    app = tiny_app_factory(
        "--model", str(tiny_model_dir), "--retrain-preset", "fast", data_dir=data
    )
    _vote_some(app)

    def retrain():
        with contextlib.suppress(httpx.HTTPError):  # the app dies under this request
            post(app, "retrain")

    threading.Thread(target=retrain, daemon=True).start()
    worker, deadline = None, time.monotonic() + 60
    while worker is None and time.monotonic() < deadline:
        worker = next(
            (p for p in psutil.process_iter(["cmdline"])
             if "alignment.worker" in " ".join(p.info["cmdline"] or [])),
            None,
        )  # fmt: skip
        time.sleep(0.1)
    assert worker is not None, "the cycle never started its worker process"
    app.stop(signal.SIGKILL)  # the app dies without any chance to clean up
    worker.wait(timeout=30)  # ... and its worker goes with it (raises if still alive)

    app = tiny_app_factory("--model", str(tiny_model_dir), data_dir=data)
    app.stop()
    con = duckdb.connect(str(app.db), read_only=True)
    status, error, config = con.execute(
        "SELECT status, error, config FROM training_runs"
    ).fetchone()
    con.close()
    assert status == "failed" and "interrupted" in error
    job = json.loads(config)["job"]
    left = {p.name for p in (data / "jobs").glob("*/*")}
    assert job and "preferences.jsonl" not in left and "prompts.jsonl" not in left


def test_cli_retrain_versions_rollback_without_the_app(tiny_app_factory, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "offline"
    app = tiny_app_factory("--model", str(tiny_model_dir), data_dir=data)
    _vote_some(app)
    app.stop()

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "assistant", *args, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=600,
        )

    # one session cast every vote: without the app, the CLI is told it is one person's install
    out = cli(
        "retrain", "--model", str(tiny_model_dir), "--retrain-preset", "fast", "--single-user"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "status: deployed" in out.stdout and "version: v0001" in out.stdout
    assert "reward model" in out.stderr  # progress bar on the terminal
    listing = cli("versions")
    assert listing.returncode == 0
    lines = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert lines == {"v0000": "previous", "v0001": "serving"}
    assert cli("rollback", "v0000").returncode == 0
    assert "v0000 serving" in " ".join(cli("versions").stdout.split())
    missing = cli("rollback", "v0042")
    assert missing.returncode == 2 and "unknown version" in missing.stderr
