"""Where a cycle's worker runs: a child process of the app (the default), or a Ray job on a
cluster (`--ray-address`), so that a GPU for training need not sit in the box that serves the page.

Both run the same entry point, `python -m alignment.worker JOB_DIR`, and hand the loop a
`Worker`: an awaitable exit code and a way to stop it. Everything else goes through the job
folder as it does for a child process (`alignment.job`): the worker appends progress to
`progress.jsonl`, which the loop relays, and writes `result.json` and the new version. A Ray job
therefore needs the job folder and the versions folder (both under the data directory) at the
same path on the Ray node, and this interpreter (`sys.executable`) and this code there too: a
shared filesystem, or the same image mounted the same way (docs/deployment.md). It also samples
its rollouts from the serving engine at `Job.engine_url`, which the node must reach.

Ray is an optional extra (`cluster`); it is imported only when `--ray-address` is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import secrets
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from alignment.job import STOPPED_MARK
from engine.lifetime import die_with_parent
from storage.errors import AppError

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a Ray job's status is read
SAY_PENDING_AFTER_S = 2.0  # a job is PENDING for a second or so while Ray starts it: not news
LOST_AFTER_S = 60.0  # a cluster that has not answered this long fails the cycle
CONNECT_TIMEOUT_S = 15.0  # the check at start: an address that hangs must not hang the app
STOPPED_EXIT = -signal.SIGTERM  # a stopped Ray job reads as a worker killed by SIGTERM
STOP_WAIT_S = 30.0  # how long `RayWorker.stop` waits for Ray to say the job stopped
# The app machine's own: they would point a worker on another machine at the wrong devices or
# cluster (Ray sets these for the job itself).
MACHINE_LOCAL = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "PWD")
INSTALL_RAY = "pip install 'online-aligned-assistant[cluster]'"
RAY_JOB_FILE = "ray-job.json"  # in the job folder: which cluster runs it, under which id


class LaunchError(AppError):
    """The cycle's worker cannot be started where it was asked to run; the message says why."""

    status = 503


class Worker(Protocol):
    """A running cycle worker, as the loop follows it."""

    async def wait(self) -> int:
        """Its exit code once it has ended (0: it wrote its result). Cancelling the wait does
        not stop the worker."""
        ...

    async def stop(self) -> None:
        """End it now: the cycle was cancelled (the app is stopping, or lost the lead)."""
        ...


class Launcher(Protocol):
    async def launch(
        self, job: Path, environment: dict[str, str] | None, wait_s: float | None
    ) -> Worker:
        """Start the worker on `job` with `environment` (None: this process's). `wait_s`: how
        long it may wait to be placed before the cycle fails (None: as long as it takes)."""
        ...


def worker_command(job: Path) -> list[str]:
    return [sys.executable, "-m", "alignment.worker", str(job)]


class LocalWorker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class LocalLauncher:
    """The worker as a child process of the app, which it dies with; its output goes to the job's
    `worker.log`. Nothing is ever waited for: it starts at once."""

    async def launch(
        self, job: Path, environment: dict[str, str] | None, wait_s: float | None
    ) -> LocalWorker:
        with open(job / "worker.log", "wb") as worker_log:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *worker_command(job),
                stdout=worker_log,
                stderr=asyncio.subprocess.STDOUT,
                env=environment,
                preexec_fn=die_with_parent,  # an app that dies takes its cycle with it
            )
        return LocalWorker(proc)


class RayLauncher:
    """Each cycle as a Ray job (Ray's Jobs API, the dashboard's address) asking for `gpus` GPUs
    for its entry point. Made at start, so that a missing Ray or an address that does not answer
    fails the start, not the first cycle minutes later."""

    def __init__(self, address: str, gpus: int) -> None:
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as exc:
            raise LaunchError(f"--ray-address needs Ray, an optional extra: {INSTALL_RAY}") from exc
        self.address = address
        self.gpus = gpus
        try:
            self.client = _within(CONNECT_TIMEOUT_S, lambda: JobSubmissionClient(address))
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, a timeout...
            raise LaunchError(
                f"the Ray cluster at --ray-address {address} does not answer ({exc}); give the "
                "address of its dashboard, e.g. http://head:8265 (`ray start --head` prints it)"
            ) from exc

    async def launch(
        self, job: Path, environment: dict[str, str] | None, wait_s: float | None
    ) -> RayWorker:
        # unique on a cluster several apps may share (the job folder's name is unique per app)
        submission_id = f"assistant-{job.name}-{secrets.token_hex(3)}"
        entrypoint = " ".join(shlex.quote(part) for part in worker_command(job))
        # first, so that an app that dies right after submitting still knows what to stop
        (job / RAY_JOB_FILE).write_text(
            json.dumps({"address": self.address, "submission_id": submission_id})
        )
        await asyncio.to_thread(
            self.client.submit_job,
            entrypoint=entrypoint,
            entrypoint_num_gpus=self.gpus,
            runtime_env={"env_vars": ray_environment(environment)},
            submission_id=submission_id,
            metadata={"job_folder": str(job)},
        )
        log.info("cycle %s submitted to Ray at %s as %s", job.name, self.address, submission_id)
        return RayWorker(self.client, submission_id, job, wait_s)


class RayWorker:
    """A submitted Ray job, watched from one task of its own (so the loop may cancel its waits
    without cancelling the watch). While Ray cannot place it (no GPU free), the job folder's
    progress says so with Ray's own message, as a "waiting" line the Admin tab and `assistant
    retrain` show like any other; past `wait_s` the job is stopped and the cycle fails with the
    reason. At the end Ray's copy of the worker's output goes to the job's `worker.log`.

    Ray (2.60, ray-project/ray#58353) cannot stop a job it has not placed yet: `stop_job` is
    queued until the job starts, and the job stays PENDING until then or until Ray gives up on it
    (RAY_JOB_START_TIMEOUT_SECONDS, 15 minutes by default). So a stop also leaves
    `STOPPED_MARK` in the job folder, and a worker that Ray starts after all leaves at once."""

    def __init__(self, client, submission_id: str, job: Path, wait_s: float | None) -> None:
        self.client = client
        self.id = submission_id
        self.job = job
        self.wait_s = wait_s
        self.submitted = time.monotonic()
        self._stopped = False
        self._watch = asyncio.create_task(self._follow())

    async def wait(self) -> int:
        try:
            return await asyncio.shield(self._watch)
        except asyncio.CancelledError:
            if self._stopped and self._watch.cancelled():  # `stop` gave up waiting on Ray
                return STOPPED_EXIT
            raise

    async def stop(self) -> None:
        """Stop the job and wait (a while) for Ray to say it stopped, so that `wait` answers
        with its exit code: a cycle cancelled by an admin ends recorded as such."""
        self._stopped = True
        await self._stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._watch), STOP_WAIT_S)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - not stopped in time: leave it
            self._watch.cancel()
            await self._save_logs()

    async def _stop(self) -> None:
        (self.job / STOPPED_MARK).touch()
        try:
            await asyncio.to_thread(self.client.stop_job, self.id)
        except Exception:  # noqa: BLE001 - the cycle ends either way; say so in the log
            log.exception("could not stop the Ray job %s", self.id)

    async def _follow(self) -> int:
        from ray.job_submission import JobStatus

        said, answered = None, time.monotonic()
        while True:
            await asyncio.sleep(POLL_S)
            try:
                info = await asyncio.to_thread(self.client.get_job_info, self.id)
            except Exception as exc:  # noqa: BLE001 - a cluster that is briefly away is retried
                if time.monotonic() - answered < LOST_AFTER_S:
                    continue
                self._fail(
                    f"the Ray cluster has not answered for {LOST_AFTER_S:.0f} s ({exc}); its job "
                    f"{self.id} may still run"
                )
                return 1
            answered = time.monotonic()
            waited = answered - self.submitted
            if info.status == JobStatus.PENDING:
                if waited >= SAY_PENDING_AFTER_S and info.message != said:
                    said = info.message
                    self._say("waiting", {"reason": info.message, "ray_job": self.id})
                if self.wait_s is not None and waited > self.wait_s:
                    await self._stop()
                    self._fail(
                        f"Ray did not start the cycle's job {self.id} within the cycle's budget "
                        f"({self.wait_s / 60:g} min, cycle.budget_minutes): {info.message}"
                    )
                    await self._save_logs()
                    return 1
            elif info.status.is_terminal():
                code = {JobStatus.SUCCEEDED: 0, JobStatus.STOPPED: STOPPED_EXIT}.get(info.status, 1)
                if code != 0 and not (self.job / "error.txt").exists():
                    # Ray's reason when the worker never got to write its own (a failed start)
                    (self.job / "error.txt").write_text(
                        f"the Ray job {self.id} ended {info.status.value}: {info.message}\n"
                    )
                await self._save_logs()
                return code

    def _say(self, stage: str, details: dict) -> None:
        """A progress line in the worker's format: the loop relays it as it relays the worker's
        own (the worker has not started while Ray places it, so nobody else writes then)."""
        line = {"time": time.time(), "stage": stage, **details}
        with open(self.job / "progress.jsonl", "a") as progress:
            progress.write(json.dumps(line) + "\n")

    def _fail(self, reason: str) -> None:
        (self.job / "error.txt").write_text(reason + "\n")
        self._say("failed", {"error": reason})

    async def _save_logs(self) -> None:
        try:
            logs = await asyncio.to_thread(self.client.get_job_logs, self.id)
        except Exception as exc:  # noqa: BLE001 - the logs are a courtesy; the cycle's result stands
            logs = f"(could not read them: {exc})\n"
        with open(self.job / "worker.log", "a") as worker_log:
            worker_log.write(f"--- the Ray job {self.id}'s output ---\n{logs}")


def ray_environment(environment: dict[str, str] | None) -> dict[str, str]:
    """The worker's environment for a Ray job: the one it would get here (the app's, without its
    secrets), less what belongs to this machine, and with this code first on the import path
    (Ray starts the entry point in a directory of its own choosing)."""
    source = dict(os.environ if environment is None else environment)
    env = {k: v for k, v in source.items() if k not in MACHINE_LOCAL and not k.startswith("RAY_")}
    code = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([code, *filter(None, [env.get("PYTHONPATH")])])
    return env


def stop_abandoned(job: Path) -> None:
    """Stop the Ray job of a cycle whose app died (killed, or a leader that lost its database
    connection): a child process died with its app, a Ray job goes on, and would write the
    version the next cycle is about to reserve again. Called where such runs are failed
    (`assistant.server.fail_interrupted_runs`); nothing to do for a cycle that ran here."""
    if not (job / RAY_JOB_FILE).exists():
        return
    (job / STOPPED_MARK).touch()  # if Ray has not placed it yet (see RayWorker)
    ray_job = json.loads((job / RAY_JOB_FILE).read_text())
    try:
        from ray.job_submission import JobSubmissionClient

        client = _within(CONNECT_TIMEOUT_S, lambda: JobSubmissionClient(ray_job["address"]))
        _within(CONNECT_TIMEOUT_S, lambda: client.stop_job(ray_job["submission_id"]))
    except Exception:  # noqa: BLE001 - the run is failed either way; say what may still run
        log.exception(
            "could not stop the Ray job %s of an interrupted cycle on %s",
            ray_job["submission_id"],
            ray_job["address"],
        )


def cycle_launcher(ray_address: str | None, cycle_gpus: int) -> Launcher:
    """The launcher the settings ask for: Ray's with `--ray-address`, else a child process."""
    if ray_address:
        return RayLauncher(ray_address, cycle_gpus)
    return LocalLauncher()


def _within(seconds: float, call):
    """`call()`'s result, or TimeoutError after `seconds` (the call goes on in a daemon thread,
    which the process does not wait for)."""
    answer: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            answer.put((True, call()))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            answer.put((False, exc))

    threading.Thread(target=run, daemon=True).start()
    try:
        ok, value = answer.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError(f"no answer within {seconds:g} s") from None
    if not ok:
        raise value
    return value
