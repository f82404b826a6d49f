"""The app-side retrain loop: snapshot votes, train in a worker process, record, hot-swap.

storage -> snapshot files -> `alignment.worker` process -> new version -> engine.reload_weights.
At most one cycle runs at a time. A failed or killed worker leaves serving untouched and the run is
marked failed; weights are swapped only after a complete result is read. The engine swap drains
in-flight requests (they finish on the old weights), queues new ones and resets the prefix cache.

A cycle is known by its run id (its `training_runs` row): `start` answers with it as soon as the
run is recorded and lets the cycle go on in the background; `run` and `follow` read the row and
the worker's progress file, so a restarted app still answers for finished cycles.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path

from alignment.config import CycleConfig
from alignment.job import Job, JobResult
from alignment.labels import agreement_rate, weighted_ai_rows
from alignment.launch import Launcher, LocalLauncher, Worker
from alignment.serving import serve_version
from alignment.sources import cap_source_share
from storage import AppError, ConflictError, Store
from storage.export import preference_records, verdict_records

log = logging.getLogger(__name__)
# What anyone may read of a failed cycle (the page's status line): the error itself can name
# paths and the engine's URL; it goes to the log and the run's record.
CYCLE_FAILED = "the cycle failed; the server log says why"
POLL_S = 0.5  # how often the worker's progress file is read (it writes a line per step)
LEADER_ANSWER_S = 60.0  # how long a process that does not lead waits for the leader to start
NOT_LEADING = (
    "this app process does not lead (several share the database): {what} runs on the leading "
    "one (GET /api/health says which leads); send it there"
)


class LeaderAnswer(AppError):
    """The leading process refused (or never answered) a cycle asked for on another one: its
    own answer, status included, passed on."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


QUIET_S = 15.0  # `follow` says it is alive at least this often: proxies drop a silent stream


class AlignmentLoop:
    """The one owner of retraining in the app. A cycle, a rollback and pruning all take its
    lock, so none can run inside another: a rollback in the middle of a cycle's swap would
    leave the store and the engine disagreeing on the serving version, and pruning could
    delete the checkpoint a cycle is about to serve. It trains in a worker process, not here,
    so chat stays responsive and a crashed cycle cannot touch serving; and it keeps each cycle
    in the store, not only in memory, so a restarted app still answers for a cycle it started.
    The scheduler, the admin API and the CLI all ask it rather than starting cycles
    themselves."""

    def __init__(
        self,
        store: Store,
        engine,
        data_dir: Path,
        cycle: CycleConfig | None = None,
        on_progress: Callable[[dict], None] | None = None,
        *,
        worker_environment: Callable[[], dict[str, str]] | None = None,
        launcher: Launcher | None = None,
        keep_versions: int = 5,
        ai_label_weight: float = 0.5,
        max_source_share: float = 1.0,
    ) -> None:
        # The running canary, if the app judges new versions by the users' votes first
        # (`assistant.canary_service`); None: a version that passes the gate deploys at once.
        self.canary = None
        # every cycle's settings, resolved once at start (`assistant.config.AppConfig.validate`:
        # preset, files, flags); the default preset when none is given
        self.cycle = cycle if cycle is not None else CycleConfig()
        self.keep_versions = keep_versions
        self.ai_label_weight = ai_label_weight
        # the most of the decisive votes one session or address counts for (alignment.sources)
        self.max_source_share = max_source_share
        self.store = store
        self.engine = engine
        self.data_dir = data_dir
        self.on_progress = on_progress
        # The worker's environment, made when it starts (None: this process's): the app's
        # leaves out its secrets (`assistant.environment.child_environment`).
        self.worker_environment = worker_environment
        # where the worker runs: a child process here, or a Ray job (`alignment.launch`)
        self.launcher: Launcher = launcher if launcher is not None else LocalLauncher()
        self.lock = asyncio.Lock()
        self.stage = "idle"
        self.events: list[dict] = []  # the running (or last) cycle's progress lines
        self.last: dict | None = None  # the last cycle's summary, for the page's status line
        self.run_id: str | None = None  # the running (or last) cycle's, once it is recorded
        self._background: set[asyncio.Task] = set()  # cycles `start` runs (the loop holds
        # only weak references to tasks)
        # False on an app process that does not lead (several on one Postgres): its cycles
        # are asked of the leader through the store (`assistant.leadership`)
        self.leading = True
        self._worker = None  # the running cycle's worker, while it trains (`cancel` stops it)
        self._cancelled: str | None = None  # who cancelled the running cycle, for its record

    @property
    def sft(self) -> bool:
        """Whether cycles fine-tune on revisions and demonstrations first (`--sft`)."""
        return self.cycle.sft.enabled

    @property
    def running(self) -> bool:
        return self.lock.locked()

    async def retrain(self, recorded: asyncio.Future | None = None) -> dict:
        """One cycle now, with the settings resolved at start (`self.cycle`); returns a summary
        (deployed, rejected or failed). `recorded`, if given, gets the run id as soon as the cycle
        is recorded (see `start`)."""
        if not self.leading:  # the leader runs it; this process follows it through the store
            run = await self.run(await self._ask_leader())
            while run["status"] == "running":
                await asyncio.sleep(POLL_S * 4)
                run = await self.run(run["run_id"])
            return run["result"]
        if self.lock.locked():
            raise ConflictError("a retrain cycle is already running")
        if self.canary is not None and self.canary.running:
            c = self.canary.current
            raise ConflictError(
                f"a canary is running ({c['challenger']} against {c['serving']}): the users are "
                "judging the last version; promote or retire it first"
            )
        async with self.lock:
            self.run_id = None
            try:
                self.last = await self._cycle(recorded)
                return self.last
            except Exception as exc:
                said = exc.public() if isinstance(exc, AppError) else CYCLE_FAILED
                self.last = {"status": "failed", "error": str(exc), "public_error": said}
                if self.run_id is not None:  # recorded, then failed: its record says so
                    await self._record_failure(self.run_id, said, exc)
                raise
            finally:
                self.stage = "idle"

    async def _record_failure(self, run_id: str, said: str, exc: Exception) -> None:
        try:
            await asyncio.to_thread(
                self.store.finish_run, run_id, "failed", {"public_error": said}, str(exc)
            )
        except Exception:  # noqa: BLE001 - the cycle's own error is the one to raise
            log.exception("could not record cycle %s as failed", run_id)

    async def start(self) -> str:
        """Start one cycle and return its run id as soon as it is recorded (its votes
        snapshotted, the worker about to start); it goes on in the background, and `run`
        and `follow` report on it. What refuses a cycle (one running, a canary, no decisive
        votes) raises here, as it does from `retrain`."""
        if not self.leading:
            return await self._ask_leader()
        recorded: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def cycle() -> None:
            try:
                await self.retrain(recorded)
            except Exception as exc:  # noqa: BLE001 - nobody awaits this task: said or logged
                if not recorded.done():
                    recorded.set_exception(exc)  # refused before it was recorded
                else:
                    log.warning("cycle %s failed: %s", self.run_id, exc)  # and recorded so
            finally:
                if not recorded.done():  # stopped (the app is stopping) before it was recorded
                    recorded.cancel()

        task = asyncio.create_task(cycle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # a caller that goes away (a client hanging up) must not cancel the cycle's future
        return await asyncio.shield(recorded)

    async def cancel(self, run_id: str | None = None) -> dict:
        """Stop the running cycle's worker (its Ray job, or its child process): the cycle ends
        as failed, "cancelled by an admin", and nothing of it is deployed. `run_id`, if given,
        must be the running cycle's. A cycle not yet training (its votes being read) or already
        gating and deploying cannot be cancelled: the answer says so (409)."""
        if not self.leading:
            raise ConflictError(NOT_LEADING.format(what="the cycle"))
        if not self.running:
            raise ConflictError("no retrain cycle is running")
        if run_id is not None and run_id != self.run_id:
            raise ConflictError(f"{run_id} is not the running cycle ({self.run_id})")
        worker = self._worker
        if worker is None:
            raise ConflictError(
                f"the cycle is {self.stage}, not training: it can be cancelled while it trains"
            )
        self._cancelled = "cancelled by an admin"
        await worker.stop()
        return {"run_id": self.run_id, "status": "cancelled"}

    async def _ask_leader(self) -> str:
        """A cycle asked of the leading process: its run id once it has started it, or its
        refusal as it gave it."""
        request_id = await asyncio.to_thread(self.store.request_cycle)
        deadline = time.monotonic() + LEADER_ANSWER_S
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S / 2)
            row = await asyncio.to_thread(self.store.cycle_request, request_id)
            if row is not None and row["run_id"]:
                return row["run_id"]
            if row is not None and row["error"]:
                raise LeaderAnswer(row["error"], row["status"] or 409)
        error = LeaderAnswer("no app process leads right now; the cycle was not started", 503)
        error.retry_after_s = 30
        await asyncio.to_thread(self.store.answer_cycle_request, request_id, None, "expired", 503)
        raise error

    async def serve_cycle_requests(self) -> None:
        """On the leading process: start the cycles other processes were asked for, and answer
        each with its run id or the refusal (the same one `start` raises here)."""
        for request_id in await asyncio.to_thread(self.store.pending_cycle_requests):
            try:
                run_id = await self.start()
            except AppError as exc:
                await asyncio.to_thread(
                    self.store.answer_cycle_request, request_id, None, exc.public(), exc.status
                )
            else:
                await asyncio.to_thread(self.store.answer_cycle_request, request_id, run_id)

    async def aclose(self) -> None:
        """Stop a cycle `start` runs (the app is stopping): its worker dies with the app, and
        the next start marks the run interrupted, as for a cycle a request or the scheduler
        ran."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def run(self, run_id: str) -> dict:
        """A cycle by its run id: `{"run_id", "status", "started_at", "finished_at", "events",
        "result"}`; `status` is "running" until it ends, `events` its progress lines so far,
        `result` the summary `retrain` returned (null while it runs). NotFoundError for an id
        that is no cycle."""
        row = await asyncio.to_thread(self.store.training_run, run_id)
        job = row["config"].get("job")
        events = await asyncio.to_thread(read_progress, Path(job) / "progress.jsonl") if job else []
        return {
            "run_id": run_id,
            "status": row["status"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "events": events,
            "result": None if row["status"] == "running" else run_summary(row),
        }

    async def follow(self, run_id: str, after: int = 0) -> AsyncIterator[tuple[str, int, dict]]:
        """A cycle's progress as it goes: ("progress", n, line) for each progress line past
        the first `after` (n counts from 1), then ("result", n, summary) once it has ended;
        ("quiet", n, {}) when nothing came for `QUIET_S`. Ends after the result."""
        seen, said_at = after, time.monotonic()
        while True:
            run = await self.run(run_id)
            for line in run["events"][seen:]:
                seen += 1
                said_at = time.monotonic()
                yield "progress", seen, line
            if run["status"] != "running":
                yield "result", seen, run["result"]
                return
            if time.monotonic() - said_at >= QUIET_S:
                said_at = time.monotonic()
                yield "quiet", seen, {}
            await asyncio.sleep(POLL_S)

    async def _sft_examples(self) -> list[dict]:
        """Constitutional revisions ("ai") and the replies users wrote themselves ("human")."""
        ai = await asyncio.to_thread(self.store.revisions)
        human = await asyncio.to_thread(self.store.demonstrations)
        return [{**r, "source": "ai"} for r in ai] + [
            {"prompt": d["prompt"], "revision": d["text"], "source": "human"} for d in human
        ]

    async def _cycle(self, recorded: asyncio.Future | None = None) -> dict:
        self.stage = "snapshot"
        rows = await asyncio.to_thread(self.store.voted_pairs)
        # no one session or address decides alone what everybody is served
        decisive = [r for r in rows if r["choice"] in ("a", "b")]
        counted = cap_source_share(decisive, self.max_source_share)
        over_share = len(decisive) - len(counted)
        human = preference_records(counted, "trl")
        ai_rows = await asyncio.to_thread(self.store.ai_labeled_pairs)
        records = human + preference_records(weighted_ai_rows(ai_rows, self.ai_label_weight), "trl")
        revisions = await self._sft_examples() if self.sft else []
        agreement, compared = agreement_rate(await asyncio.to_thread(self.store.label_pairs))
        prompts = await asyncio.to_thread(self.store.logged_prompts)
        sources = await asyncio.to_thread(self.store.new_vote_sources)
        if decisive and not counted:
            raise ConflictError(
                f"all {len(decisive)} decisive votes came from one session or address, which "
                f"may count for at most {self.max_source_share:.0%} of them: more people need "
                "to vote (an install where one person casts every vote: --single-user)"
            )
        if not human:
            raise ConflictError("no decisive votes yet (A or B): vote on some replies first")
        serving = await asyncio.to_thread(self.store.serving_version)
        if not Path(serving["path"]).is_dir():
            raise ConflictError(
                "retraining needs the served checkpoint on disk: with --vllm-url, "
                "also pass --model DIR (the checkpoint the server was started with)"
            )
        version = await asyncio.to_thread(self.store.next_version)
        job = self.data_dir / "jobs" / f"{version}-{int(time.time())}"
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        job.mkdir(mode=0o700)  # it holds copies of users' chats until the cycle ends
        Job(
            serving_model=serving["path"],
            parent=serving["version"],
            version=version,
            engine_url=self.engine.base_url,
            versions_dir=str(self.data_dir / "versions"),
            cycle=self.cycle,
        ).write(job)
        _write_jsonl(job / "preferences.jsonl", records)
        _write_jsonl(job / "prompts.jsonl", prompts)
        _write_jsonl(job / "verdicts.jsonl", verdict_records(rows))
        _write_jsonl(job / "revisions.jsonl", revisions)
        run_id = await asyncio.to_thread(
            self.store.start_run,
            "cycle",
            {
                "version": version,
                "parent": serving["version"],
                "pairs": len(records),
                "human_pairs": len(human),
                "votes_over_share": over_share,
                "ai_pairs": len(records) - len(human),
                "cycle": asdict(self.cycle),
                "job": str(job),
            },
        )
        self.run_id = run_id
        if recorded is not None and not recorded.done():
            recorded.set_result(run_id)

        self.stage = "training"
        started = time.perf_counter()
        self.events = []
        # a cycle waits to be placed (a Ray job while no GPU is free) within its budget
        wait_s = self.cycle.budget_minutes * 60 if self.cycle.budget_minutes > 0 else None
        try:
            worker = await self.launcher.launch(
                job, self.worker_environment() if self.worker_environment else None, wait_s
            )
            self._worker, self._cancelled = worker, None
            try:
                code = await self._follow(worker, job / "progress.jsonl")
            except asyncio.CancelledError:  # the app stops, or lost the lead: so does the cycle
                await worker.stop()  # a Ray job would outlive the app; a child process not
                raise
            finally:
                self._worker = None
        finally:
            remove_user_data(job)
            shutil.rmtree(job / "adapters", ignore_errors=True)  # PPO's, if the worker died
        result_path = job / "result.json"
        if self._cancelled is not None:  # stopped by `cancel`, whatever the worker left
            error = self._cancelled
            await asyncio.to_thread(
                self.store.finish_run, run_id, "failed", {"public_error": error}, error
            )
            log.warning("cycle %s: %s", version, error)
            return {"status": "failed", "version": version, "error": error, "public_error": error}
        if code != 0 or not result_path.exists():
            error = (
                (job / "error.txt").read_text()[:2000]
                if (job / "error.txt").exists()
                else (f"worker exited with code {code}")
            )
            await asyncio.to_thread(self.store.finish_run, run_id, "failed", None, error)
            log.warning("cycle %s failed: %s", version, error.splitlines()[0])
            return {
                "status": "failed",
                "version": version,
                "error": error.splitlines()[0],
                "public_error": CYCLE_FAILED,
            }
        result = JobResult.read(job)
        metrics = {
            "reward": result.reward,
            "gate": result.gate,
            "sft": result.sft,
            "human_pairs": len(human),
            "ai_pairs": len(records) - len(human),
            "vote_sources": sources,
            "votes_over_share": over_share,  # decisive votes left out: one source's share
            "ai_human_agreement": agreement,
            "agreement_pairs": compared,
            "ppo_steps": result.ppo_steps,
            "seconds": result.seconds,
            "cycle_seconds": time.perf_counter() - started,
            "peak_rss_mb": result.peak_rss_mb,
            "budget": result.budget,
        }
        if result.path is None:
            await asyncio.to_thread(
                self.store.record_model_version,
                version,
                serving["version"],
                "",
                "rejected",
                metrics,
            )
            await asyncio.to_thread(self.store.finish_run, run_id, "rejected", metrics)
            return {
                "status": "rejected",
                "version": version,
                "reason": result.gate["reason"],
                **metrics,
            }

        if self.canary is not None and self.canary.config.share > 0:
            if result.adapter is None:
                metrics["canary"] = "none: an SFT cycle's adapter is not on the serving weights"
            else:
                self.stage = "canary"
                try:
                    await self.canary.start(
                        version,
                        serving["version"],
                        result.adapter,
                        {**metrics, "path": result.path},
                    )
                except Exception as exc:  # noqa: BLE001 - e.g. an engine without LoRA support
                    log.warning("canary not started, deploying at the gate: %s", exc)
                    said = exc.public() if isinstance(exc, AppError) else type(exc).__name__
                    metrics["canary"] = f"could not start ({said}); deployed at the gate"
                else:
                    await asyncio.to_thread(self.store.finish_run, run_id, "challenger", metrics)
                    return {"status": "challenger", "version": version, **metrics}

        self.stage = "swap"
        await asyncio.to_thread(
            self.store.record_model_version,
            version,
            serving["version"],
            result.path,
            "candidate",
            metrics,
        )
        swap = await serve_version(self.store, self.engine, version)
        metrics["swap_seconds"] = swap
        await self.prune_after_deploy()
        await asyncio.to_thread(self.store.finish_run, run_id, "deployed", metrics)
        return {"status": "deployed", "version": version, **metrics}

    async def _follow(self, worker: Worker, progress: Path) -> int:
        """Wait for the worker, relaying its progress lines as they are written."""
        seen = 0
        while True:
            try:
                code = await asyncio.wait_for(worker.wait(), timeout=POLL_S)
            except asyncio.TimeoutError:
                code = None
            for event in read_progress(progress)[seen:]:
                seen += 1
                self.events.append(event)
                self.stage = event.get("stage", self.stage)
                if self.on_progress:
                    self.on_progress(event)
            if code is not None:
                return code

    def status(self) -> dict:
        """The running cycle's stage and its latest progress line, for the admin tab."""
        return {
            "running": self.running,
            "stage": self.stage,
            "last": self.events[-1] if self.events else None,
        }

    async def history(self) -> dict:
        """Versions and finished cycles with their metrics, for the admin tab's table and plots."""
        from alignment.monitors import annotated_versions

        versions = await asyncio.to_thread(annotated_versions, self.store)
        runs = await asyncio.to_thread(self.store.training_runs)
        return {"versions": versions, "runs": runs}

    async def prune_after_deploy(self) -> None:
        """--keep-versions: old checkpoints go once a new version serves (lock held)."""
        if self.keep_versions > 0:
            from alignment.pruning import prune

            await asyncio.to_thread(
                prune, self.store, self.data_dir / "versions", self.keep_versions
            )

    async def prune(self, keep: int) -> dict:
        """Delete old checkpoints (see `alignment.pruning`); not while a cycle runs."""
        from alignment.pruning import prune

        if not self.leading:
            raise ConflictError(NOT_LEADING.format(what="pruning"))
        if self.lock.locked():
            raise ConflictError("a retrain cycle is running; prune after it ends")
        async with self.lock:
            result = await asyncio.to_thread(prune, self.store, self.data_dir / "versions", keep)
            return result.as_dict()

    async def rollback(self, version: str) -> dict:
        if not self.leading:
            raise ConflictError(NOT_LEADING.format(what="a rollback"))
        if self.lock.locked():
            raise ConflictError("a retrain cycle is running; roll back after it ends")
        async with self.lock:
            await asyncio.to_thread(self.store.servable_path, version)  # refuse before retiring
            if self.canary is not None and self.canary.running:
                await self.canary.finish("retired", f"an admin rolled back to {version}")
            swap = await serve_version(self.store, self.engine, version)
            return {"status": "serving", "version": version, "swap_seconds": swap}


def read_progress(path: Path) -> list[dict]:
    """The progress lines the worker has written to its job's `progress.jsonl` so far (up to
    one it is still writing)."""
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written; read it next time
    return events


def run_summary(row: dict) -> dict:
    """A finished cycle's summary from its `training_runs` row, in the shape `retrain`
    returned it (the row keeps its metrics, and the error whose first line it answered)."""
    status, metrics, version = row["status"], row["metrics"], row["config"].get("version")
    if status == "refused":  # by the scheduler, before it started (`Store.refuse_cycle`)
        return {"status": status, "reason": row["error"], **metrics}
    if status == "failed":
        return {
            "status": status,
            "version": version,
            "error": (row["error"] or "").splitlines()[0] if row["error"] else "",
            "public_error": metrics.get("public_error", CYCLE_FAILED),
        }
    if status == "rejected":
        return {
            "status": status,
            "version": version,
            "reason": metrics["gate"]["reason"],
            **metrics,
        }
    return {"status": status, "version": version, **metrics}


USER_DATA_FILES = ("preferences.jsonl", "verdicts.jsonl", "prompts.jsonl", "revisions.jsonl")


def remove_user_data(job: Path) -> None:
    """The worker is done with the copies of users' chats: delete them, keep the metrics
    (job.json, progress.jsonl, result.json, worker.log), so a deleted conversation does not
    live on in a job folder."""
    for name in USER_DATA_FILES:
        (job / name).unlink(missing_ok=True)


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
