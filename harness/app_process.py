"""`assistant run` in a subprocess, as a user starts it; shared by the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"  # what the shared test apps are started with
# Simulated users all come from 127.0.0.1, where real ones each have an address: the limits per
# address (votes a minute, share of the backlog, sessions issued, share of the votes) would make
# them one user. Tests of those limits pass their own values after these (the last flag wins).
MANY_USERS_ON_ONE_ADDRESS = [
    "--max-votes-per-minute-per-address", "0",
    "--max-votes-per-minute-total", "0",
    "--max-backlog-share", "1",
    "--max-sessions-per-minute-per-address", "0",
    "--max-vote-source-share", "1",
]  # fmt: skip
# A version that passes the gate serves at once instead of first facing the users as a canary
# challenger: for tests and benchmarks that measure a deployed version (the canary has its own).
DEPLOY_AT_THE_GATE = ["--canary-share", "0"]
TINY_MAX_MODEL_LEN = 512  # the tiny model's engines: short prompts and replies only


READY_LINE = re.compile(rb"\[app\] ready on http://[^\s:]+:(\d+)")


def ready_port(log: Path, since: int = 0) -> int | None:
    """The port an app started with `--port 0` printed on its ready line (at or after byte
    `since` of its log), once it has: the system picked it when the app bound it, so nothing
    else can have taken it meanwhile."""
    found = READY_LINE.findall(log.read_bytes()[since:]) if log.exists() else []
    return int(found[-1]) if found else None


class AppProcess:
    """`assistant run` in a subprocess, as a user starts it; talked to over real HTTP."""

    def __init__(
        self,
        args: list[str],
        data_dir: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        repo: Path = REPO,
    ) -> None:
        self.env = env or {}
        self.repo = repo  # the checkout whose code runs (a benchmark may compare two)
        self.requested_port = port or 0  # 0: the app binds a free one and says which
        self.port: int | None = port
        self.data_dir = data_dir
        self.db = data_dir / "assistant.duckdb"
        self.log = data_dir / "app.log"
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900) -> AppProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "assistant",
            "run",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.requested_port),
            *self.args,
        ]
        started_at = self.log.stat().st_size if self.log.exists() else 0  # a restart appends
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.repo,
                env={**os.environ, **self.env},
            )
        self.admin_token = {**os.environ, **self.env}.get("ASSISTANT_ADMIN_TOKEN")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited {self.proc.returncode}:\n{self.log.read_text()}")
            if self.requested_port == 0:
                self.port = ready_port(self.log, since=started_at)
                if self.port is None:
                    time.sleep(0.5)
                    continue
            try:
                if httpx.get(self.url + "/api/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def admin_headers(self) -> dict[str, str]:
        """The app's admin token: from its environment, else the one it generated and stored."""
        stored = self.data_dir / "secrets" / "admin-token"
        token = self.admin_token or (stored.read_text().strip() if stored.exists() else None)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def export(self, fmt: str = "trl") -> httpx.Response:
        """`GET /api/export` as the operator (it needs the admin token)."""
        return httpx.get(
            self.url + "/api/export", params={"format": fmt}, headers=self.admin_headers()
        )

    def new_session(self) -> dict[str, str]:
        """Headers carrying a session this app issued (`POST /api/session`)."""
        r = httpx.post(self.url + "/api/session", timeout=30)
        r.raise_for_status()
        return {"X-Session-Id": r.json()["session_id"]}

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def chat_turns(app: AppProcess, messages: list[str], at_once: int = 8) -> list[dict]:
    """One new conversation per message through `POST /api/chat`, `at_once` at a time (the
    engine batches them); the chat answers, in order."""
    gate = asyncio.Semaphore(at_once)
    async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:

        async def one(message: str) -> dict:
            async with gate:
                r = await client.post("/api/chat", json={"message": message})
                assert r.status_code == 200, r.text
                return r.json()

        return await asyncio.gather(*(one(m) for m in messages))


def two_style_app_args(model: Path, retrain_config: Path) -> list[str]:
    """`assistant run` flags for the learning and canary tests on the two-style model: short
    sampled replies, no critique worker, simulated users who vote instantly and as fast as they
    like, cycles only by hand, with the given retrain config."""
    return [
        "--model", str(model),
        "--max-model-len", "512",
        "--max-new-tokens", "16",
        "--temperature", "1.0",
        "--no-cai",
        "--reading-words-per-second", "0",
        "--max-votes-per-minute", "0",
        "--retrain-every-votes", "0",
        "--retrain-every-minutes", "0",
        "--retrain-config", str(retrain_config),
        *MANY_USERS_ON_ONE_ADDRESS,
    ]  # fmt: skip


def tiny_app_flags(cai: bool = False) -> list[str]:
    """`assistant run` flags for an app like the shared tiny engine's, whatever its engine:
    short, varied replies; no background critique worker unless a test asks for it (it would
    load the shared engine); and simulated users vote instantly, so their votes are not flagged
    as too fast to have read. `harness.in_process` starts its apps with them too."""
    return [
        "--reading-words-per-second",
        "0",
        "--max-new-tokens",
        "16",
        "--temperature",
        "1.0",
        *([] if cai else ["--no-cai"]),
        *MANY_USERS_ON_ONE_ADDRESS,
        *DEPLOY_AT_THE_GATE,
    ]


def tiny_app_args(engine_url: str, cai: bool, *extra: str) -> list[str]:
    """`assistant run` flags for an app on the shared tiny engine (`tiny_app_flags`), then
    `extra` (the last flag given wins)."""
    return ["--vllm-url", engine_url, *tiny_app_flags(cai), *extra]
