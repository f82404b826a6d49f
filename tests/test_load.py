"""Load: 32 simulated users chat and vote concurrently for a bounded time (tiny model, real HTTP,
real engine, real DuckDB); every acknowledged vote is in the database afterwards and nothing 5xx."""

from __future__ import annotations

import asyncio
import time

import duckdb
import httpx


def test_32_users_every_acknowledged_vote_is_stored(tiny_app_factory):
    app = tiny_app_factory("--max-backlog", "64", "--max-new-tokens", "8")
    acknowledged: list[str] = []
    statuses: list[int] = []
    latencies: list[float] = []
    stop_at = time.monotonic() + 30  # bounded in time and in count

    async def user(client: httpx.AsyncClient, u: int) -> None:
        conversation = None
        for turn in range(20):
            if time.monotonic() > stop_at:
                return
            body = {"message": f"user {u} turn {turn}"}
            if conversation:
                body["conversation_id"] = conversation
            start = time.perf_counter()
            r = await client.post(app.url + "/api/chat", json=body)
            latencies.append(time.perf_counter() - start)
            statuses.append(r.status_code)
            if r.status_code != 200:
                continue
            # A new conversation every 5 turns keeps prompts inside the tiny engine's window.
            conversation = r.json()["conversation_id"] if turn % 5 != 4 else None
            v = await client.post(
                app.url + "/api/vote",
                json={"pair_id": r.json()["pair_id"], "choice": "ab"[turn % 2]},
            )
            statuses.append(v.status_code)
            if v.status_code == 200:
                acknowledged.append(v.json()["pair_id"])

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(user(client, u) for u in range(32)))

    asyncio.run(run())
    app.stop()
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert len(acknowledged) >= 32  # every user got at least one turn through
    con = duckdb.connect(str(app.db), read_only=True)
    stored = {r[0] for r in con.execute("SELECT pair_id FROM votes").fetchall()}
    con.close()
    assert stored == set(acknowledged)
    latencies.sort()
    print(
        f"{len(acknowledged)} votes; chat latency p50 {latencies[len(latencies) // 2]:.2f} s, "
        f"p95 {latencies[int(len(latencies) * 0.95)]:.2f} s"
    )
