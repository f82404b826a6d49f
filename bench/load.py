"""Load: N simulated users chat and vote concurrently through the HTTP API for a bounded time.

Reports chat latency, vote round-trip latency and the vote's write time (the app's
`Server-Timing: db;dur=` header: the vote journal's line for a recent pair, else the writer
thread's queue plus the DuckDB commit) as p50/p99,
acknowledged votes against what the database holds afterwards, and any 5xx.

`run_load` is shared with tests/test_load.py, which asserts on the same figures.
Also the same writes with nothing else running, for comparison.
Run: `.venv/bin/python -m bench.load` (tiny model on its own vLLM engine, 32 users, 60 s);
`--write-scaling`: only the writes alone, on databases already holding many voted turns;
`--apps 2 --db postgresql://...` (or `--apps 2 --db postgres` for a throwaway cluster): N app
processes on one Postgres against one app on DuckDB, alternated `--rounds` times on one engine,
the users spread over the apps as a load balancer would; with the CPU seconds each kind of
process used, to see where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
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


def run_load(
    url: str | list[str],
    users: int = 32,
    seconds: float = 30,
    turns: int = 20,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Each user chats and votes in turn; a new conversation every 5 turns keeps prompts short.
    Users start no new turn after `seconds`, or once `stop` is set (a load that lasts as long as
    something else runs in another thread)."""
    result = LoadResult()
    stop_at = time.monotonic() + seconds
    urls = [url] if isinstance(url, str) else url

    async def user(client: httpx.AsyncClient, u: int) -> None:
        url = urls[u % len(urls)]  # a load balancer's round robin, sticky per user
        conversation = None
        for turn in range(turns):
            if time.monotonic() > stop_at or (stop is not None and stop.is_set()):
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


def fill_voted_pairs(db_path: Path, n: int) -> None:
    """`n` voted turns (five to a conversation) written in bulk, as a long-lived app's
    database holds them: random-looking ids as the store makes, so no scan is pruned by luck."""
    import duckdb

    def key(prefix: str, expr: str) -> str:
        return f"md5('{prefix}' || ({expr})::VARCHAR)"

    con = duckdb.connect(str(db_path))
    rows = f"FROM range({n}) t(i)"
    con.execute(
        f"INSERT INTO conversations (id) SELECT {key('c', 'i // 5')} {rows} WHERE i % 5 = 0"
    )
    con.execute(
        "INSERT INTO pairs (id, conversation_id, position, prompt, model_version, seed) "
        f"SELECT {key('p', 'i')}, {key('c', 'i // 5')}, 2 * (i % 5), '[]', 'v0000', i {rows}"
    )
    con.execute(
        "INSERT INTO candidates (id, pair_id, slot, text, model_version, sampling) "
        f"SELECT {key('k', 'i')} || s, {key('p', 'i')}, s, 'a reply', 'v0000', '{{}}' {rows}, "
        "(VALUES ('a'), ('b')) u(s)"
    )
    for role, offset in (("user", 0), ("assistant", 1)):
        con.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, pair_id) "
            f"SELECT {key('m' + role, 'i')}, {key('c', 'i // 5')}, 2 * (i % 5) + {offset}, "
            f"'{role}', 'text', {key('p', 'i')} {rows}"
        )
    con.execute(
        "INSERT INTO votes (id, pair_id, choice) "
        f"SELECT {key('v', 'i')}, {key('p', 'i')}, 'a' {rows}"
    )
    con.execute("CHECKPOINT")
    con.close()


def isolated_write_latency(n: int = 200, stored: int = 0, location: str | None = None) -> dict:
    """The same writes with nothing else running: a turn (`record_pair`) and its vote (every
    other one on the journal's path, the rest on the writer's), on a DuckDB file holding
    `stored` voted turns already. What the store costs by itself, to
    compare with the figures under load, and how that grows with the database."""
    from storage import Store
    from storage.store import CandidateRecord, VoteWrite

    with tempfile.TemporaryDirectory() as tmp:
        if stored:
            Store(Path(tmp) / "bench.duckdb").close()  # the schema
            fill_voted_pairs(Path(tmp) / "bench.duckdb", stored)
        store = Store(location or Path(tmp) / "bench.duckdb")  # location: a Postgres URL
        pair_ms, vote_ms, writer_ms = [], [], []
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
            if i % 2:  # the writer thread's path: a pair the store no longer keeps in memory
                store._acknowledged.forget_pair(pair.pair_id)
            start = time.perf_counter()
            voted = store.vote(VoteWrite(pair.pair_id, "a"))
            # the app's path for a recent pair: answered from its journal line, on this thread
            # (on Postgres there is no journal: every vote takes the writer's path)
            assert i % 2 or voted.done() or location is not None
            voted.result()
            (writer_ms if i % 2 else vote_ms).append(1000 * (time.perf_counter() - start))
        store.close()
    return {
        "isolated_turn_write_p50_ms": percentile(pair_ms, 50),
        "isolated_turn_write_p99_ms": percentile(pair_ms, 99),
        "isolated_vote_write_p50_ms": percentile(vote_ms, 50),
        "isolated_vote_write_p99_ms": percentile(vote_ms, 99),
        "isolated_vote_writer_path_p50_ms": percentile(writer_ms, 50),
        "isolated_vote_writer_path_p99_ms": percentile(writer_ms, 99),
    }


def write_scaling(sizes: tuple[int, ...] = (0, 10_000, 50_000)) -> dict:
    """Isolated writes against databases of growing size: a write that scans a table gets
    slower every day the app runs; one that looks its rows up by key does not."""
    return {f"stored_{size}": isolated_write_latency(stored=size) for size in sizes}


def server_error_traces(log: str, limit: int = 3) -> str:
    """The first `limit` requests' tracebacks in the app's log, whole, and the engine's errors:
    a 5xx's body says only "Internal Server Error" or the engine's public message, the log says
    why (a failed background cycle is not a request's)."""
    marker = "Exception in ASGI application"
    traces = [marker + chunk.split("\nINFO")[0] for chunk in log.split(marker)[1 : limit + 1]]
    engine = [line for line in log.splitlines() if "EngineError: " in line][:limit]
    return "\n".join(traces + engine) or "(no request's traceback or engine error in the app's log)"


def _cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each kind of process, children included."""
    import psutil

    totals: dict[str, float] = {}
    for kind, roots in pids.items():
        seconds = 0.0
        for pid in roots:
            try:
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    times = p.cpu_times()
                    seconds += times.user + times.system
            except psutil.Error:
                continue
        totals[kind] = seconds
    return totals


def _postgres_pids(socket_dir: str) -> list[int]:
    """The postmaster serving the throwaway cluster (its backends are its children)."""
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "postgres" and socket_dir in " ".join(p.info["cmdline"] or [])
    ]


def compare_postgres(args, engine_url: str, work: Path) -> dict:
    """One app on DuckDB and `args.apps` apps on one Postgres, alternated `args.rounds` times
    against the same engine: the figures of each run, then the medians and their ratios."""
    from harness.app_process import MANY_USERS_ON_ONE_ADDRESS, AppProcess
    from harness.postgres import PostgresCluster
    from storage import Store

    cluster = PostgresCluster(work / "pg").start() if args.db == "postgres" else None
    flags = [
        "--vllm-url", engine_url, "--max-new-tokens", "8", "--temperature", "1.0",
        "--max-backlog", "64", "--no-cai", "--reading-words-per-second", "0",
        *MANY_USERS_ON_ONE_ADDRESS,
    ]  # fmt: skip
    runs: list[dict] = []
    try:
        for round_ in range(args.rounds):
            for setup in ("duckdb", "postgres"):
                pids: dict[str, list[int]] = {}
                if setup == "postgres":
                    url = cluster.create_database(f"load_{round_}") if cluster else args.db
                    apps = [
                        AppProcess([*flags, "--db", url], work / f"pg{round_}-{k}").start(120)
                        for k in range(args.apps)
                    ]
                    if cluster is not None:
                        pids["postgres"] = _postgres_pids(str(cluster.socket_dir))
                else:
                    url = None
                    apps = [AppProcess(flags, work / f"duck{round_}").start(120)]
                pids["apps"] = [a.proc.pid for a in apps]
                before = _cpu_seconds(pids)
                try:
                    result = run_load([a.url for a in apps], args.users, args.seconds, 10_000)
                finally:
                    after = _cpu_seconds(pids)
                    for a in apps:
                        a.stop()
                store = Store(url or apps[0].db, read_only=True)
                try:
                    stored = {r["pair_id"] for r in store._rows("SELECT pair_id FROM votes")}
                finally:
                    store.close()
                summary = result.summary() | {
                    "setup": f"{len(apps)} app(s) on {setup}",
                    "round": round_,
                    "votes_per_minute": round(len(result.acknowledged) * 60 / args.seconds, 1),
                    "acknowledged_votes_missing_from_db": len(set(result.acknowledged) - stored),
                    "cpu_seconds": {k: round(after[k] - before.get(k, 0), 1) for k in after},
                }
                print(json.dumps(summary), flush=True)
                runs.append(summary)
    finally:
        if cluster is not None:
            cluster.stop()

    def median(setup: str, key: str) -> float | None:
        values = sorted(r[key] for r in runs if setup in r["setup"] and r[key] is not None)
        return values[len(values) // 2] if values else None

    medians = {}
    for key in ("votes_per_minute", "vote_http_p50_ms", "vote_http_p99_ms", "vote_db_p50_ms",
                "vote_db_p99_ms", "chat_p50_s", "chat_p99_s"):  # fmt: skip
        pg, duck = median("postgres", key), median("duckdb", key)
        medians[key] = {
            "duckdb": duck, "postgres": pg, "ratio": round(pg / duck, 2) if pg and duck else None
        }  # fmt: skip
    return {"users": args.users, "seconds": args.seconds, "apps": args.apps,
            "rounds": args.rounds, "medians": medians}  # fmt: skip


def main() -> None:
    import duckdb

    from assistant.config import EngineConfig
    from engine.vllm_server import EmbeddedVLLMServer
    from harness.app_process import MANY_USERS_ON_ONE_ADDRESS, AppProcess
    from harness.tiny_model import build_tiny_checkpoint

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
    parser.add_argument("--apps", type=int, default=1, help="app processes on --db (Postgres)")
    parser.add_argument(
        "--db",
        default=None,
        help="postgresql://... (or 'postgres': a throwaway cluster): compare N apps on it with "
        "one app on DuckDB",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the comparison")
    parser.add_argument(
        "--write-scaling",
        action="store_true",
        help="only the writes alone, on databases holding 0, 10,000 and 50,000 voted turns",
    )
    args = parser.parse_args()
    if args.write_scaling:
        print(json.dumps(write_scaling(), indent=2))
        return
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
            if args.db is not None:
                if args.client_nice:
                    os.nice(args.client_nice)
                print(json.dumps(compare_postgres(args, engine.url, work), indent=2))
                return
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
