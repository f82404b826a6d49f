"""One anonymous client poisoning the writes: another user's latency, before and after the fix.

The attack of issue 36: votes whose `voter` is a lone surrogate (`"\\ud800"` in JSON). Before the
fix each was acknowledged (200), then refused by DuckDB and retried forever, holding back every
other write, and the next start failed replaying it. Measured here through the product: an app
on the tiny model (a shared vLLM engine), one user chatting and voting the whole time, and after
a few seconds an attacker who opens 10 turns and votes on each with that voter. Then the app is
stopped and started again.

Before and after are two checkouts run alternately in one process (`--before REF`, default the
commit the issue was filed on, checked out in a temporary worktree), so both see the same machine.
Reported per run: the attacker's votes answered 200, the user's turn (chat + vote) and vote
p50/p99, the user's failed requests, and whether the app started again.

Run: `.venv/bin/python -m bench.poison` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from harness.app_process import REPO, TINY_MAX_MODEL_LEN, AppProcess, tiny_app_args

POISON = b'{"pair_id": "%s", "choice": "a", "voter": "\\ud800"}'


def _p(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1], 3) if len(values) > 1 else 0.0


async def _user(url: str, stop: asyncio.Event, out: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        session = (await client.post("/api/session")).json()["session_id"]
        headers = {"X-Session-Id": session}
        while not stop.is_set():
            started = time.perf_counter()
            try:
                chat = await client.post("/api/chat", json={"message": "Why is the sky blue?"},
                                         headers=headers)  # fmt: skip
                if chat.status_code != 200:
                    out["failed"] += 1
                    await asyncio.sleep(0.5)
                    continue
                voted = time.perf_counter()
                vote = await client.post(
                    "/api/vote", json={"pair_id": chat.json()["pair_id"], "choice": "a"},
                    headers=headers,
                )  # fmt: skip
            except httpx.HTTPError:
                out["failed"] += 1
                continue
            if vote.status_code != 200:
                out["failed"] += 1
                continue
            out["vote_s"].append(time.perf_counter() - voted)
            out["turn_s"].append(time.perf_counter() - started)


async def _attacker(url: str, out: dict, votes: int = 10) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for _ in range(votes):
            chat = await client.post("/api/chat", json={"message": "hi"})
            if chat.status_code != 200:
                continue
            r = await client.post(
                "/api/vote", content=POISON % chat.json()["pair_id"].encode(),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            out["attack"][r.status_code] = out["attack"].get(r.status_code, 0) + 1


async def _under_attack(url: str, seconds: float) -> dict:
    out: dict = {"vote_s": [], "turn_s": [], "failed": 0, "attack": {}}
    stop = asyncio.Event()
    user = asyncio.create_task(_user(url, stop, out))
    await asyncio.sleep(5)  # the user's pace before the attack
    await _attacker(url, out)
    await asyncio.sleep(max(0.0, seconds - 5))
    stop.set()
    await user
    return out


def one_run(label: str, repo: Path, engine_url: str, work: Path, seconds: float) -> dict:
    app = AppProcess(
        tiny_app_args(engine_url, False, "--max-votes-per-minute", "0"), work / label, repo=repo
    ).start(timeout=180)
    try:
        out = asyncio.run(_under_attack(app.url, seconds))
    finally:
        app.stop()
    try:
        app.start(timeout=120)
        restarted = "yes"
    except RuntimeError as exc:
        last = [line for line in str(exc).splitlines() if "Error" in line or "Exception" in line]
        restarted = "no: " + (last[-1][:160] if last else "exited")
    finally:
        app.stop()
    return {
        "run": label,
        "attack_votes": out["attack"],
        "user_turns": len(out["turn_s"]),
        "turn_p50_s": _p(out["turn_s"], 50),
        "turn_p99_s": _p(out["turn_s"], 99),
        "vote_p50_s": _p(out["vote_s"], 50),
        "vote_p99_s": _p(out["vote_s"], 99),
        "user_failed": out["failed"],
        "restarted": restarted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="0b43d70", help="the commit before the fix")
    parser.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternated")
    parser.add_argument("--seconds", type=float, default=40.0, help="the user's time per run")
    args = parser.parse_args()

    from assistant.config import EngineConfig
    from engine.vllm_server import EmbeddedVLLMServer
    from harness.tiny_model import build_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-poison-") as tmp:
        work = Path(tmp)
        before = work / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
            check=True, capture_output=True,
        )  # fmt: skip
        model = build_tiny_checkpoint(work / "tiny")
        config = EngineConfig(max_model_len=TINY_MAX_MODEL_LEN, max_num_seqs=32, compile="no")
        engine = EmbeddedVLLMServer(str(model), config, work / "engine.log")
        engine.start()
        rows = []
        try:
            engine.wait_ready()
            for n in range(args.rounds):
                for label, repo in (("before", before), ("after", REPO)):
                    row = one_run(f"{label}-{n + 1}", repo, engine.url, work, args.seconds)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            engine.stop()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                           capture_output=True)  # fmt: skip
    print(
        "\n| run | attacker's votes answered | user's turns | turn p50 / p99 s "
        "| vote p50 / p99 s | user's failed requests | started again |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['attack_votes']} | {r['user_turns']} | {r['turn_p50_s']} / "
            f"{r['turn_p99_s']} | {r['vote_p50_s']} / {r['vote_p99_s']} | {r['user_failed']} | "
            f"{r['restarted']} |"
        )


if __name__ == "__main__":
    main()
