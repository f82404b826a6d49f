"""Load: N simulated users chat and vote concurrently through the HTTP API for a bounded time.

Reports chat latency, vote round-trip latency and the vote's database write time (the app's
`Server-Timing: db;dur=` header: the single-writer queue plus the DuckDB commit) as p50/p99,
acknowledged votes against what the database holds afterwards, and any 5xx.

`run_load` is shared with tests/test_load.py, which asserts on the same figures.
Also the same writes with nothing else running, for comparison.
Run: `.venv/bin/python -m bench.load` (tiny model on its own vLLM engine, 32 users, 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class LoadResult:
    acknowledged: list[str] = field(default_factory=list)  # pair ids of 200-acknowledged votes
    statuses: list[int] = field(default_factory=list)
    chat_s: list[float] = field(default_factory=list)
    vote_s: list[float] = field(default_factory=list)
    vote_db_ms: list[float] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)  # the 5xx answers' bodies

    def summary(self) -> dict:
        return {
            "votes_acknowledged": len(self.acknowledged),
            "http_5xx": sum(s >= 500 for s in self.statuses),
            "http_5xx_reasons": sorted(set(self.server_errors))[:5],
            "chat_p50_s": percentile(self.chat_s, 50),
            "chat_p99_s": percentile(self.chat_s, 99),
            "vote_http_p50_ms": percentile([1000 * s for s in self.vote_s], 50),
            "vote_http_p99_ms": percentile([1000 * s for s in self.vote_s], 99),
            "vote_db_p50_ms": percentile(self.vote_db_ms, 50),
            "vote_db_p99_ms": percentile(self.vote_db_ms, 99),
        }


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))], 3)


def run_load(url: str, users: int = 32, seconds: float = 30, turns: int = 20) -> LoadResult:
    """Each user chats and votes in turn; a new conversation every 5 turns keeps prompts short."""
    result = LoadResult()
    stop_at = time.monotonic() + seconds

    async def user(client: httpx.AsyncClient, u: int) -> None:
        conversation = None
        for turn in range(turns):
            if time.monotonic() > stop_at:
                return
            body = {"message": f"user {u} turn {turn}"}
            if conversation:
                body["conversation_id"] = conversation
            start = time.perf_counter()
            r = await client.post(url + "/api/chat", json=body)
            result.chat_s.append(time.perf_counter() - start)
            result.statuses.append(r.status_code)
            if r.status_code >= 500:
                result.server_errors.append(f"chat {r.status_code}: {r.text[:160]}")
            if r.status_code != 200:
                continue
            conversation = r.json()["conversation_id"] if turn % 5 != 4 else None
            start = time.perf_counter()
            v = await client.post(
                url + "/api/vote", json={"pair_id": r.json()["pair_id"], "choice": "ab"[turn % 2]}
            )
            result.vote_s.append(time.perf_counter() - start)
            result.statuses.append(v.status_code)
            if v.status_code >= 500:
                result.server_errors.append(f"vote {v.status_code}: {v.text[:160]}")
            if v.status_code == 200:
                result.acknowledged.append(v.json()["pair_id"])
                timing = v.headers.get("server-timing", "")
                if "dur=" in timing:
                    result.vote_db_ms.append(float(timing.split("dur=")[1]))

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(user(client, u) for u in range(users)))

    asyncio.run(main())
    return result


def isolated_write_latency(n: int = 200) -> dict:
    """The same writes with nothing else running: a turn (`record_pair`) and its vote, on a fresh
    DuckDB file. What the store costs by itself, to compare with the figures under load."""
    from storage import Store
    from storage.store import CandidateRecord

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        pair_ms, vote_ms = [], []
        for i in range(n):
            conversation = store.create_conversation()
            candidates = tuple(
                CandidateRecord(slot, f"reply {i}", "v0000", {"seed": i}, 12, 8, "length", 1.0)
                for slot in "ab"
            )
            start = time.perf_counter()
            pair = store.record_pair(
                conversation, f"turn {i}", [{"role": "user", "content": f"turn {i}"}],
                "v0000", i, candidates,
            )  # fmt: skip
            pair_ms.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            store.record_vote(pair.pair_id, "a")
            vote_ms.append(1000 * (time.perf_counter() - start))
        store.close()
    return {
        "isolated_turn_write_p50_ms": percentile(pair_ms, 50),
        "isolated_turn_write_p99_ms": percentile(pair_ms, 99),
        "isolated_vote_write_p50_ms": percentile(vote_ms, 50),
        "isolated_vote_write_p99_ms": percentile(vote_ms, 99),
    }


def server_error_traces(log: str, limit: int = 3) -> str:
    """The first `limit` tracebacks in the app's log: a 5xx's body says only "Internal Server
    Error", the log says why."""
    traces = [
        "Traceback" + chunk.split("\nINFO")[0] for chunk in log.split("Traceback")[1 : limit + 1]
    ]
    return "\n".join(traces) or "(no traceback in the app's log)"


def main() -> None:
    import duckdb

    from assistant.config import EngineConfig
    from assistant.vllm_server import EmbeddedVLLMServer
    from tests.app_process import MANY_USERS_ON_ONE_ADDRESS, AppProcess
    from tests.tiny_model import build_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--engine-nice", type=int, default=0, help="the engine's niceness")
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="the simulated users' niceness once the app is up (real users are on other machines)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_checkpoint(work / "tiny")
        engine_config = EngineConfig(
            max_model_len=512, max_num_seqs=32, compile="no", nice=args.engine_nice
        )
        engine = EmbeddedVLLMServer(str(model), engine_config, work / "e")
        engine.start()
        try:
            engine.wait_ready()
            app = AppProcess(
                [
                    "--vllm-url", engine.url,
                    "--max-new-tokens", "8",
                    "--temperature", "1.0",
                    "--max-backlog", "64",
                    "--no-cai",
                    "--reading-words-per-second", "0",
                    *MANY_USERS_ON_ONE_ADDRESS,
                ],
                work / "app",
            ).start(timeout=120)  # fmt: skip
            try:
                if args.client_nice:
                    os.nice(args.client_nice)  # this process only: the app and engine keep theirs
                result = run_load(app.url, args.users, args.seconds, turns=10_000)
            finally:
                app.stop()
            if result.server_errors:  # the app's own account of its 5xx, before tmp goes
                print(server_error_traces(app.log.read_text(errors="replace")), file=sys.stderr)
            con = duckdb.connect(str(app.db), read_only=True)
            stored = {r[0] for r in con.execute("SELECT pair_id FROM votes").fetchall()}
            con.close()
        finally:
            engine.stop()
    summary = (
        result.summary()
        | {
            "users": args.users,
            "seconds": args.seconds,
            "engine_nice": args.engine_nice,
            "client_nice": args.client_nice,
            "acknowledged_votes_missing_from_db": len(set(result.acknowledged) - stored),
        }
        | isolated_write_latency()
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
