"""A retrain cycle as a Ray job (`--ray-address`): through a local Ray head on this machine (CPU,
the tiny model) it deploys and serves, and its progress reaches the app; a cycle Ray cannot place
says so while it waits, and fails with Ray's reason once its budget has passed.

One machine stands for the cluster here: the job folder and the versions folder are at the same
path for the Ray job because they are on the same disk (docs/deployment.md says what a real
cluster needs). The head is started in its own session, from a directory of its own (so the job
runs where Ray puts it, not in this checkout), and only that session's processes are ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from engine.vllm_server import free_port

TOKEN = "s3cret-token"
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class RayHead:
    address: str  # the dashboard's: what --ray-address and the Jobs API take
    temp_dir: Path
    sessions: list[int] = field(default_factory=list)  # ours: each `ray start`'s session id

    def start(self, *args: str) -> str:
        """`ray start ARGS` in a new session of its own (every process it leaves running keeps
        that session id, which is how they are found and ended); its output."""
        proc = subprocess.Popen(
            [RAY, "start", *args, "--disable-usage-stats", "--object-store-memory", "100000000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.temp_dir,
            start_new_session=True,
        )
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        return out

    def add_gpu_node(self) -> None:
        """A second node declaring one GPU (Ray takes the count as given), on this head."""
        gcs = (self.temp_dir / "ray_current_cluster").read_text().strip()
        self.start(
            "--address", gcs,
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", "1",
            "--num-gpus", "1",
            "--dashboard-agent-listen-port", str(free_port()),
        )  # fmt: skip

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def stop(self) -> None:
        """End every process of our sessions (not `ray stop`, which ends every Ray cluster of
        this user on the machine): SIGTERM, then SIGKILL what is left after 5 s."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            ours = self._processes()
            for pid in ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while ours and time.monotonic() < deadline:
                time.sleep(0.5)
                ours = self._processes()
            if not ours:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _processes(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getsid(int(entry.name)) in self.sessions:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
        return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A Ray head on 127.0.0.1: one CPU, no GPU, the dashboard (the Jobs API lives there)."""
    # short: Ray's Unix sockets live under it, and a socket's path must fit in 107 bytes
    head = RayHead("", Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")))
    dashboard = free_port()
    try:
        head.start(
            "--head",
            "--port", "0",
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", "1",
            "--num-gpus", "0",
            "--include-dashboard=true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard),
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--temp-dir", str(head.temp_dir),
        )  # fmt: skip
        head.address = f"http://127.0.0.1:{dashboard}"
        yield head
    finally:
        head.stop()


def test_a_ray_job_gets_the_workers_environment_less_what_belongs_to_this_machine():
    from alignment.launch import ray_environment

    env = ray_environment(
        {"HOME": "/home/a", "CUDA_VISIBLE_DEVICES": "1", "RAY_ADDRESS": "x", "PYTHONPATH": "/p"}
    )
    code = str(Path(__file__).resolve().parents[1])
    assert env == {"HOME": "/home/a", "PYTHONPATH": f"{code}{os.pathsep}/p"}
    assert ray_environment({})["PYTHONPATH"] == code  # Ray starts it where it likes: this code


def post(app, route: str, token: str = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{app.url}/api/{route}", json={}, headers=headers, timeout=600)


def finished(app, run_id: str, timeout: float) -> dict:
    """`GET /api/retrain/{id}` once the cycle has ended."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + timeout
    while True:
        run = httpx.get(f"{app.url}/api/retrain/{run_id}", headers=headers, timeout=30).json()
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, run
        time.sleep(1)


def vote(app, n: int = 6) -> None:
    for i in range(n):
        turn = httpx.post(app.url + "/api/chat", json={"message": f"q {i}?"}, timeout=120).json()
        httpx.post(
            app.url + "/api/vote",
            json={"pair_id": turn["pair_id"], "choice": "ab"[i % 2]},
            timeout=30,
        ).raise_for_status()


def ray_app(factory, model, head: RayHead, gpus: str = "0", *extra: str):
    """An app on the shared tiny engine whose cycles are Ray jobs on `head`."""
    return factory(
        "--model", str(model), "--retrain-preset", "fast",
        "--ray-address", head.address, "--cycle-gpus", gpus, *extra,
    )  # fmt: skip


def jobs_of(head: RayHead, app) -> list:
    """The Ray jobs this app submitted (their entry point names its job folder)."""
    return [j for j in head.client().list_jobs() if str(app.data_dir) in j.entrypoint]


@pytest.mark.cycle  # a Ray head, and a whole cycle through the app
def test_a_cycle_runs_as_a_ray_job_deploys_and_serves(
    ray_head, tiny_app_factory, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = ray_app(tiny_app_factory, tiny_model_dir, ray_head)
    vote(app)
    started = post(app, "retrain")
    assert started.status_code == 202, started.text
    run = finished(app, started.json()["run_id"], timeout=600)
    assert run["status"] == "deployed", run
    print(f"\ncycle through Ray: {run['result']['cycle_seconds']:.1f} s")  # -s shows it

    # the worker's progress, written on the "other machine", reached the app
    stages = [line["stage"] for line in run["events"]]
    assert {"reward_model", "ppo", "gate", "done"} <= set(stages), stages
    assert "waiting" not in stages  # a free CPU: Ray placed it at once
    versions = httpx.get(app.url + "/api/versions").json()
    assert versions["serving"] == "v0001"
    turn = httpx.post(app.url + "/api/chat", json={"message": "after the swap"}, timeout=120)
    assert turn.json()["model_version"] == "v0001"

    (job,) = jobs_of(ray_head, app)  # one cycle, one Ray job
    assert job.status == "SUCCEEDED", job
    assert job.submission_id.startswith("assistant-v0001-")
    (folder,) = (app.data_dir / "jobs").iterdir()
    assert f"the Ray job {job.submission_id}'s output" in (folder / "worker.log").read_text()
    assert not (folder / "preferences.jsonl").exists()  # the chats' copies went at the end


@pytest.mark.cycle  # a Ray head, and a whole cycle through the app
def test_a_cycle_ray_cannot_place_says_so_then_fails_with_the_reason(
    ray_head, tiny_app_factory, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = tiny_app_factory(
        "--model", str(tiny_model_dir),
        "--retrain-preset", "fast",
        "--ray-address", ray_head.address,
        "--cycle-gpus", "1",  # the head has none
        "--retrain-budget-minutes", "0.25",  # how long the cycle may wait to be placed
    )  # fmt: skip
    vote(app)
    started = post(app, "retrain")
    assert started.status_code == 202, started.text
    run = finished(app, started.json()["run_id"], timeout=90)

    assert run["status"] == "failed", run
    waiting = [line for line in run["events"] if line["stage"] == "waiting"]
    assert waiting, run["events"]  # the Admin tab and `assistant retrain` show it while it waits
    assert "waiting for resources" in waiting[0]["reason"], waiting  # Ray's own words
    assert run["events"][-1]["stage"] == "failed"
    error = run["result"]["error"]
    assert "did not start" in error and "0.25 min" in error and "resources" in error, error
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"

    (job,) = jobs_of(ray_head, app)
    (folder,) = (app.data_dir / "jobs").iterdir()
    assert (folder / "stopped").exists()
    # Ray 2.60 cannot stop a job it has not placed (ray-project/ray#58353): the stop waits for
    # the job to start. Once a GPU frees up, the job ends at once and the worker touches nothing.
    progress = (folder / "progress.jsonl").read_text()
    ray_head.add_gpu_node()
    client, deadline = ray_head.client(), time.monotonic() + 60
    while not (status := client.get_job_status(job.submission_id)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_info(job.submission_id)
        time.sleep(0.5)
    assert status in ("STOPPED", "FAILED"), status
    assert (folder / "progress.jsonl").read_text() == progress
    assert not (folder / "result.json").exists()
    assert not (app.data_dir / "versions" / "v0001").exists()
    assert json.loads(progress.splitlines()[-1])["stage"] == "failed"


@pytest.mark.cycle  # a Ray head
def test_the_ray_job_of_a_cycle_whose_app_died_is_stopped_at_the_next_start(ray_head, tmp_path):
    # what `assistant.server.fail_interrupted_runs` does for each run a dead app left running:
    # its child process died with it, its Ray job did not
    from alignment.launch import RAY_JOB_FILE, stop_abandoned

    client = ray_head.client()
    submission_id = client.submit_job(entrypoint="sleep 120", entrypoint_num_gpus=0)
    job = tmp_path / "v0001-1"
    job.mkdir()
    (job / RAY_JOB_FILE).write_text(
        json.dumps({"address": ray_head.address, "submission_id": submission_id})
    )
    deadline = time.monotonic() + 60
    while client.get_job_status(submission_id) != "RUNNING":
        assert time.monotonic() < deadline, client.get_job_info(submission_id)
        time.sleep(0.5)
    stop_abandoned(job)
    while (status := client.get_job_status(submission_id)) != "STOPPED":
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert (job / "stopped").exists()  # and had Ray not placed it yet, it would leave at once
    stop_abandoned(tmp_path)  # a cycle that ran as a child process: nothing to do


@pytest.mark.cycle  # a Ray head, and a cycle through the app
def test_cancelling_a_cycle_stops_its_ray_job_and_deploys_nothing(
    ray_head, tiny_app_factory, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = ray_app(tiny_app_factory, tiny_model_dir, ray_head)
    assert post(app, "retrain/no-such-run/cancel").status_code == 409  # nothing runs
    vote(app)
    run_id = post(app, "retrain").json()["run_id"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 300
    while not httpx.get(f"{app.url}/api/retrain/{run_id}", headers=headers).json()["events"]:
        assert time.monotonic() < deadline, "the worker never reported progress"
        time.sleep(0.2)  # training: the worker has written its first progress line
    cancelled = post(app, f"retrain/{run_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"run_id": run_id, "status": "cancelled"}
    run = finished(app, run_id, timeout=120)
    assert run["status"] == "failed" and run["result"]["error"] == "cancelled by an admin", run
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    (job,) = jobs_of(ray_head, app)
    deadline = time.monotonic() + 60
    while job.status not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
        (job,) = jobs_of(ray_head, app)
    assert job.status == "STOPPED", job
    assert post(app, f"retrain/{run_id}/cancel").status_code == 409  # it no longer runs
