"""Alignment benchmark on the embedded default: a full retrain cycle and the hot-swap under load.

1. Start the app (embedded SmolLM2, default cycle settings) with an admin token.
2. Simulated users chat and vote (`--votes` pairs, 8 at a time; the simulated preference: the
   shorter reply wins).
3. `POST /api/retrain`: one full cycle (reward model, PPO, gate, merge, swap); stage timings.
4. Hot-swap under load: 8 users keep chatting while the new version is rolled back and forward
   (`POST /api/rollback`); failed or truncated replies are counted.

Run: `.venv/bin/python -m bench.alignment --votes 200` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from bench.generation import PROMPTS
from harness.app_process import DEPLOY_AT_THE_GATE, MANY_USERS_ON_ONE_ADDRESS, AppProcess

TOKEN = "bench-token"


async def simulate_votes(url: str, n: int, users: int = 8) -> None:
    async def user(client, u):
        for i in range(u, n, users):
            r = await client.post(
                url + "/api/chat", json={"message": PROMPTS[i % len(PROMPTS)] + f" (#{i})"}
            )
            r.raise_for_status()
            a, b = (c["text"] for c in r.json()["candidates"])
            choice = "a" if len(a) <= len(b) else "b"
            await client.post(
                url + "/api/vote", json={"pair_id": r.json()["pair_id"], "choice": choice}
            )

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(user(client, u) for u in range(users)))


async def swap_under_load(url: str, versions: list[str]) -> dict:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outcomes = {"ok": 0, "failed": 0, "truncated": 0}
    swaps = []
    stop = asyncio.Event()

    async def user(client, u):
        while not stop.is_set():
            r = await client.post(url + "/api/chat", json={"message": PROMPTS[u]})
            if r.status_code != 200:
                outcomes["failed"] += 1
                continue
            body = r.json()
            if any(not c["text"] for c in body["candidates"]):
                outcomes["truncated"] += 1
            else:
                outcomes["ok"] += 1
            await client.post(url + "/api/vote", json={"pair_id": body["pair_id"], "choice": "a"})

    async with httpx.AsyncClient(timeout=600) as client:
        users = [asyncio.create_task(user(client, u)) for u in range(8)]
        await asyncio.sleep(5)
        for v in versions:
            r = await client.post(url + "/api/rollback", json={"version": v}, headers=auth)
            swaps.append(r.json().get("swap_seconds"))
            await asyncio.sleep(5)
        stop.set()
        await asyncio.gather(*users)
    return {**outcomes, "swap_seconds": swaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ["ASSISTANT_ADMIN_TOKEN"] = TOKEN
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        app = AppProcess(
            [
                "--reading-words-per-second",  # simulated users vote instantly
                "0",
                *MANY_USERS_ON_ONE_ADDRESS,
                *DEPLOY_AT_THE_GATE,
                "--no-cai",
                "--model",
                str(repo / "data/models/SmolLM2-135M-Instruct"),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--retrain-every-votes",
                "0",
                "--retrain-every-minutes",
                "0",
            ],
            Path(tmp) / "app",
        ).start()
        try:
            t = time.perf_counter()
            asyncio.run(simulate_votes(app.url, args.votes))
            collect = time.perf_counter() - t
            t = time.perf_counter()
            cycle = httpx.post(
                app.url + "/api/retrain?wait=true",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=None,
            ).json()
            cycle_wall = time.perf_counter() - t
            load = (
                asyncio.run(swap_under_load(app.url, ["v0000", cycle["version"]]))
                if cycle.get("status") == "deployed"
                else None
            )
        finally:
            app.stop()
    steps = cycle.get("ppo_steps") or []
    print(
        json.dumps(
            {
                "votes": args.votes,
                "collect_seconds": round(collect, 1),
                "status": cycle.get("status"),
                "reason": cycle.get("reason"),
                "cycle_wall_seconds": round(cycle_wall, 1),
                "stage_seconds": cycle.get("seconds"),
                "reward": cycle.get("reward"),
                "gate": cycle.get("gate"),
                "ppo_steps": steps,
                "swap_seconds": cycle.get("swap_seconds"),
                "under_load": load,
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
