"""Retrain, deploy and roll back through the running app's API (tiny model, real engine).

`POST /api/retrain` starts a cycle and answers at once; `GET /api/retrain/{id}` and its event
stream follow it, and `assistant retrain` follows it with its progress bar.
"""

from __future__ import annotations

import json
import time

import httpx

TOKEN = "s3cret-token"


def post(app, route, body=None, token=TOKEN, timeout=600):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{app.url}/api/{route}", json=body or {}, headers=headers, timeout=timeout)


def get(app, path, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(app.url + path, headers=headers, timeout=30)


def server_sent_events(app, run_id, last_event_id=None) -> list[tuple[str, str, dict]]:
    """(event, id, data) of each event `GET /api/retrain/{id}/events` streams, as they come,
    read until the stream ends (it does once the cycle has)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events, block = [], {}
    url = f"{app.url}/api/retrain/{run_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith(":"):
                continue  # the stream's sign of life
            if line:
                field, _, value = line.partition(": ")
                block[field] = value
            elif block:
                events.append((block["event"], block["id"], json.loads(block["data"])))
                block = {}
    return events


def finished(app, run_id, timeout=600) -> dict:
    """`GET /api/retrain/{id}` once the cycle has ended."""
    deadline = time.monotonic() + timeout
    while (run := get(app, f"/api/retrain/{run_id}").json())["status"] == "running":
        assert time.monotonic() < deadline, run
        time.sleep(1)
    return run


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

    asked = time.monotonic()
    started = post(app, "retrain")
    answered_in = time.monotonic() - asked
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    assert started.json() == {"run_id": run_id, "status": "running"}
    assert started.headers["location"] == f"/api/retrain/{run_id}"
    running = get(app, started.headers["location"])
    assert running.status_code == 200, running.text
    assert running.json()["status"] == "running" and running.json()["result"] is None
    assert post(app, "retrain").status_code == 409  # one cycle at a time
    assert get(app, f"/api/retrain/{run_id}", token=None).status_code == 401
    assert get(app, f"/api/retrain/{run_id}/events", token="wrong").status_code == 401
    assert get(app, "/api/retrain/no-such-run").status_code == 404
    assert get(app, "/api/retrain/no-such-run/events").status_code == 404

    # the event stream: each progress line as it comes, numbered, then the summary; it ends
    events = server_sent_events(app, run_id)
    *progress, (last, _, body) = events
    assert last == "result" and {kind for kind, _, _ in progress} == {"progress"}
    assert [int(n) for _, n, _ in progress] == list(range(1, len(progress) + 1))
    stages = [line["stage"] for _, _, line in progress]
    assert {"reward_model", "ppo", "gate", "done"} <= set(stages), stages
    assert body["status"] == "deployed" and body["version"] == "v0001", body
    assert body["swap_seconds"] > 0 and body["reward"]["n_train"] > 0
    # answered long before the cycle ended
    assert answered_in < min(30, body["cycle_seconds"] / 3), (answered_in, body["cycle_seconds"])
    done = get(app, f"/api/retrain/{run_id}").json()
    assert done["status"] == "deployed" and done["result"] == body and done["finished_at"]
    assert done["events"] == [line for _, _, line in progress]
    # a client that reconnects with Last-Event-ID gets the rest only
    n = len(progress)
    again = server_sent_events(app, run_id, last_event_id=n - 2)
    assert again == [*events[n - 2 : n], ("result", str(n), body)]

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


def test_a_cycle_cancelled_while_it_trains_ends_failed_and_deploys_nothing(
    tiny_app_factory, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    assert post(app, "retrain/no-such-run/cancel").status_code == 409  # nothing runs
    _vote_some(app, 6)
    run_id = post(app, "retrain").json()["run_id"]
    deadline = time.monotonic() + 300
    while not get(app, f"/api/retrain/{run_id}").json()["events"]:
        assert time.monotonic() < deadline, "the worker never reported progress"
        time.sleep(0.2)  # training: the worker has written its first progress line
    assert post(app, "retrain/another-run/cancel").status_code == 409  # not the running one
    cancelled = post(app, f"retrain/{run_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    deadline = time.monotonic() + 120
    while (run := get(app, f"/api/retrain/{run_id}").json())["status"] == "running":
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
    assert run["status"] == "failed" and run["result"]["error"] == "cancelled by an admin", run
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    assert not any((app.data_dir / "versions").glob("v0001*"))  # nothing of it kept
    assert post(app, f"retrain/{run_id}/cancel").status_code == 409


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
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("ASSISTANT_OPENAI_API_KEY", "openai-key")
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    _vote_some(app)
    started = post(app, "retrain")
    assert started.status_code == 202, started.text
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
    body = finished(app, started.json()["run_id"], timeout=120)["result"]
    assert body["status"] == "failed", body
    # Serving is untouched: same version, chat still works.
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    turn = httpx.post(app.url + "/api/chat", json={"message": "still here?"}, timeout=120)
    assert turn.status_code == 200 and turn.json()["model_version"] == "v0000"
    httpx.post(app.url + "/api/vote", json={"pair_id": turn.json()["pair_id"], "choice": "a"})
    # The next cycle works: `assistant retrain` starts it and follows it with its progress bar.
    out = subprocess.run(
        [sys.executable, "-m", "assistant", "retrain", "--url", app.url]
        + ["--data-dir", str(app.data_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # (v0001 was the killed cycle's: no two cycles write the same folder)
    assert "status: deployed" in out.stdout and "version: v0002" in out.stdout, out.stdout
    assert "reward models: " in out.stdout and "gate: " in out.stdout  # the summary
    assert "following its progress" in out.stderr
    assert "reward model" in out.stderr and "PPO" in out.stderr  # the progress bar
    post(app, "rollback", {"version": "v0000"})  # leave the shared engine on the base weights


def test_app_killed_mid_cycle_takes_its_worker_along_and_restart_marks_the_run_failed(
    tiny_app_factory, tiny_model_dir, monkeypatch, tmp_path
):
    import signal

    import duckdb
    import psutil

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    data = tmp_path / "killed"
    app = tiny_app_factory(
        "--model", str(tiny_model_dir), "--retrain-preset", "fast", data_dir=data
    )
    _vote_some(app)
    run_id = post(app, "retrain").json()["run_id"]
    worker, deadline = None, time.monotonic() + 60
    while worker is None and time.monotonic() < deadline:
        worker = next(
            (p for p in psutil.Process(app.proc.pid).children()  # this app's, not another's
             if "alignment.worker" in " ".join(p.cmdline())),
            None,
        )  # fmt: skip
        time.sleep(0.1)
    assert worker is not None, "the cycle never started its worker process"
    app.stop(signal.SIGKILL)  # the app dies without any chance to clean up
    worker.wait(timeout=30)  # ... and its worker goes with it (raises if still alive)

    app = tiny_app_factory("--model", str(tiny_model_dir), data_dir=data)
    # the restarted app still answers for the cycle, from its record
    run = get(app, f"/api/retrain/{run_id}").json()
    assert run["status"] == "failed" and run["result"]["status"] == "failed", run
    assert "interrupted" in run["result"]["error"] and run["finished_at"]
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


def test_a_refused_cycle_is_refused_to_whoever_starts_it_and_one_runs_at_a_time(tmp_path):
    """`start` answers the refusal itself (no run was recorded to follow) and leaves nothing
    running; while a cycle holds the loop, a second start is refused at once."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from alignment.loop import AlignmentLoop
    from storage import ConflictError

    nothing = SimpleNamespace(
        voted_pairs=list,
        ai_labeled_pairs=list,
        label_pairs=list,
        logged_prompts=list,
        new_vote_sources=dict,
    )
    loop = AlignmentLoop(nothing, SimpleNamespace(), tmp_path)

    async def scenario() -> None:
        with pytest.raises(ConflictError, match="no decisive votes"):
            await loop.start()
        await asyncio.sleep(0)
        assert not loop.running and not loop._background and loop.run_id is None
        async with loop.lock:  # a cycle running
            with pytest.raises(ConflictError, match="already running"):
                await loop.start()

    asyncio.run(scenario())


def test_a_finished_cycle_reads_back_in_the_shape_it_was_answered_in():
    from alignment.loop import CYCLE_FAILED, run_summary

    metrics = {"gate": {"reason": "not better"}, "reward": {"n_train": 3}, "ppo_steps": []}
    row = {"config": {"version": "v0003"}, "metrics": metrics, "error": None}
    assert run_summary({**row, "status": "rejected"}) == {
        "status": "rejected",
        "version": "v0003",
        "reason": "not better",
        **metrics,
    }
    deployed = {**metrics, "swap_seconds": 0.4}
    assert run_summary({**row, "status": "deployed", "metrics": deployed}) == {
        "status": "deployed",
        "version": "v0003",
        **deployed,
    }
    failed = {**row, "status": "failed", "metrics": {}, "error": "worker died\ntraceback"}
    assert run_summary(failed) == {
        "status": "failed",
        "version": "v0003",
        "error": "worker died",
        "public_error": CYCLE_FAILED,
    }
