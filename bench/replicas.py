"""Replicas: the app on one vLLM replica against the same app on two, under load, on this box.

Two `vllm serve` replicas of SmolLM2-135M-Instruct start on loopback ports, as an operator
starts them (`engine.vllm_server.EmbeddedVLLMServer`), each with a part of the machine: its own
KV cache (`--kv-cache-gib`, 1 GiB each: 32 users' short turns need about 0.2 GiB) and, on a CPU,
its own share of the cores for its model worker's threads (`VLLM_CPU_OMP_THREADS_BIND`: on 2
cores one core each; with fewer cores than replicas they share); on a box with two GPUs, one GPU
each. Two apps start in front of them, `--vllm-url r1` and `--vllm-url r1 --vllm-url r2`, with
`bench.load`'s settings (many users on one address, no Constitutional AI worker) and no cycles.

1. **Throughput and latency.** For each users level (`--users 8,16,32`) `bench.load.run_load`
   (each user chats and votes in turn, a closed loop) runs `--seconds` against the 1-replica app,
   then the 2-replica one (the order flips from one level to the next, so drift hits both).
   Reported: turns per minute, chat p50/p99, failed requests, the ratios 2-vs-1, and the share
   of requests the second replica served (vLLM's own counter).
2. **Rolling swap under load.** With `--swap-users` users chatting on the 2-replica app,
   `POST /api/rollback {"version": "v0000"}` `--swaps` times: a rollback to the serving
   version still runs the whole rolling swap (each replica out of rotation, drained, reloaded,
   named, back). Reported: `swap_seconds` from the answer, per replica (divided by the replicas'
   count), one idle swap for comparison, and the failed requests over the whole phase (from
   before the first swap to after the last): they must be 0.

Prints a Markdown table, then one JSON line.

What to expect on this box (2 cores): a little. One replica's model worker binds one core
(vLLM keeps the other for its API server and scheduler); a second replica's worker takes that
core, shared with both servers' front ends, the app and the simulated users. Measured: 1.15-1.29x
the turns per minute, 0.76-0.79x the median turn time (bench/RESULTS.md). What a second replica
adds besides: availability: a swap, a crash or a restart takes one replica out while the other
keeps answering.

Which figures would change on a GPU box, and why:
- turns per minute: two replicas on two GPUs double the compute (nothing shared but the app),
  so the ratio approaches 2x once one GPU is saturated; at loads one GPU batches easily (a 135M
  model at 32 users is one) it stays near 1x, since continuous batching absorbs the users;
- chat p50/p99: near 1x below saturation; past it, the queue on one replica grows and the
  2-replica p99 falls well below the 1-replica one. Here both configurations are CPU-bound, so
  the ratios say more about contention than about routing;
- swap time per replica: mostly the drain (`pause?mode=wait` waits for the turns in flight)
  plus the reload; both scale with the turn time, which is seconds here and a fraction of that
  on a GPU, so each replica's swap gets much shorter; the idle swap shrinks less (it is mostly
  reading the weights from the page cache);
- failed requests: 0 on any box; that is the invariant, not a figure of the hardware.

Run: `.venv/bin/python -m bench.replicas` (SmolLM2 must be provisioned: `.venv/bin/assistant
provision`; about 10 minutes on 2 cores with the defaults). `--smoke`: the tiny model, 4 users,
10 s, one swap: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.load import LoadResult, percentile, run_load
from harness.app_process import (
    ADMIN_TOKEN,
    DEPLOY_AT_THE_GATE,
    MANY_USERS_ON_ONE_ADDRESS,
    TINY_MAX_MODEL_LEN,
    AppProcess,
)

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
BASE_VERSION = "v0000"  # what the replicas start on (assistant.server.BASE_VERSION)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Phase:
    """One configuration's load at one users level (rounds add up)."""

    replicas: int
    users: int
    seconds: float = 0.0  # the load's wall time, the last turns' tails included
    turns: int = 0  # chat turns answered 200
    failed: int = 0  # chat or vote answers other than 200
    chat_s: list[float] = field(default_factory=list)
    served: list[float] = field(default_factory=list)  # requests each replica completed

    def add(self, result: LoadResult, seconds: float, served: list[float]) -> None:
        self.seconds += seconds
        self.turns += len(result.vote_s)  # a user votes on every turn answered 200, only those
        self.failed += sum(s != 200 for s in result.statuses)
        self.chat_s += result.chat_s
        self.served = [
            a + b for a, b in zip(self.served or [0.0] * len(served), served, strict=True)
        ]

    def summary(self) -> dict:
        return {
            "turns_per_min": round(60 * self.turns / self.seconds, 1) if self.seconds else None,
            "chat_p50_s": percentile(self.chat_s, 50),
            "chat_p99_s": percentile(self.chat_s, 99),
            "failed": self.failed,
            "turns": self.turns,
            "last_replica_share": (
                round(self.served[-1] / sum(self.served), 2) if sum(self.served) else None
            ),
        }


def replica_environments(n: int) -> list[dict[str, str]]:
    """Each replica's share of the machine: a GPU each where there are enough, else on a CPU
    an equal share of this process's cores for its model worker's threads (the same core for
    all when there are fewer cores than replicas)."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.device_count() < n:
            return [{} for _ in range(n)]  # one GPU shared, each at --gpu-memory-utilization
        return [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n)]
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // n)
    groups = [cores[i * share : (i + 1) * share] or cores[-share:] for i in range(n)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, g))} for g in groups]


def requests_done(url: str) -> float:
    """The requests a vLLM server has completed (its `vllm:request_success_total`)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def measure(app: AppProcess, urls: list[str], users: int, seconds: float, phase: Phase) -> None:
    before = [requests_done(u) for u in urls]
    started = time.perf_counter()
    result = run_load(app.url, users, seconds, turns=10_000)
    elapsed = time.perf_counter() - started
    served = [requests_done(u) - b for u, b in zip(urls, before, strict=True)]
    phase.add(result, elapsed, served)
    print(
        f"[bench] {phase.replicas} replica(s), {users} users: {len(result.vote_s)} turns in "
        f"{elapsed:.0f} s, {sum(s != 200 for s in result.statuses)} failed",
        flush=True,
    )


def rollback(app: AppProcess) -> float:
    """A rolling swap through the app's own route; the seconds it reports."""
    r = httpx.post(
        app.url + "/api/rollback", json={"version": BASE_VERSION}, headers=ADMIN, timeout=900
    )
    if r.status_code != 200:
        raise RuntimeError(f"rollback answered {r.status_code}: {r.text[:300]}")
    return r.json()["swap_seconds"]


def swaps_under_load(app: AppProcess, replicas: int, users: int, swaps: int, gap_s: float) -> dict:
    """One idle swap, then `swaps` swaps `gap_s` apart while `users` chat (from `gap_s` before
    the first to `gap_s` after the last)."""
    idle = rollback(app)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        load = pool.submit(run_load, app.url, users, float("inf"), 10_000, stop)
        swap_s = []
        try:
            for _ in range(swaps):
                time.sleep(gap_s)
                swap_s.append(rollback(app))
            time.sleep(gap_s)
        finally:
            stop.set()
        result = load.result()  # a user's exception, raised here
        elapsed = time.perf_counter() - started
    health = httpx.get(app.url + "/api/health", headers=ADMIN, timeout=30).json()["replicas"]
    return {
        "swap_users": users,
        "swap_s": [round(s, 2) for s in swap_s],
        "swap_per_replica_s": [round(s / replicas, 2) for s in swap_s],
        "idle_swap_s": round(idle, 2),
        "idle_swap_per_replica_s": round(idle / replicas, 2),
        "swap_phase_s": round(elapsed, 1),
        "swap_phase_turns": len(result.vote_s),
        "swap_phase_chat_p99_s": percentile(result.chat_s, 99),
        "swap_phase_failed": sum(s != 200 for s in result.statuses),
        "failed_reasons": sorted(set(result.server_errors))[:3],
        "all_back_in_rotation": all(
            r["in_rotation"] and r["version"] == BASE_VERSION for r in health
        ),
    }


def app_args(
    urls: list[str], model: Path, max_model_len: int, tokens: int, backlog: int
) -> list[str]:
    return [
        *(a for u in urls for a in ("--vllm-url", u)),
        "--model", str(model),  # the base version's weights: what a rollback sends the replicas
        "--max-model-len", str(max_model_len),
        "--max-new-tokens", str(tokens),
        "--temperature", "1.0",
        "--max-backlog", str(backlog),
        "--no-cai",
        "--reading-words-per-second", "0",
        "--max-votes-per-minute", "0",
        "--retrain-every-votes", "0",
        "--retrain-every-minutes", "0",
        *MANY_USERS_ON_ONE_ADDRESS,
        *DEPLOY_AT_THE_GATE,
    ]  # fmt: skip


def ratio(two: float | None, one: float | None) -> float | None:
    return round(two / one, 2) if two is not None and one else None


def shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(levels: list[int], phases: dict[tuple[int, int], Phase], swap: dict) -> str:
    rows = [
        "| users | turns/min 1 | turns/min 2 | ratio | chat p50 s 1 / 2 | ratio "
        "| chat p99 s 1 / 2 | ratio | failed 1 / 2 | replica 2's share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for users in levels:
        one, two = (phases[(n, users)].summary() for n in (1, 2))
        rows.append(
            f"| {users} | {one['turns_per_min']} | {two['turns_per_min']} "
            f"| {shown(ratio(two['turns_per_min'], one['turns_per_min']))} "
            f"| {one['chat_p50_s']} / {two['chat_p50_s']} "
            f"| {shown(ratio(two['chat_p50_s'], one['chat_p50_s']))} "
            f"| {one['chat_p99_s']} / {two['chat_p99_s']} "
            f"| {shown(ratio(two['chat_p99_s'], one['chat_p99_s']))} "
            f"| {one['failed']} / {two['failed']} | {two['last_replica_share']} |"
        )
    rows += [
        "",
        "| rolling swap, 2 replicas | seconds | per replica s |",
        "|---|---|---|",
        f"| idle | {swap['idle_swap_s']} | {swap['idle_swap_per_replica_s']} |",
        *(
            f"| under {swap['swap_users']} users, swap {i} | {s} | {p} |"
            for i, (s, p) in enumerate(
                zip(swap["swap_s"], swap["swap_per_replica_s"], strict=True), start=1
            )
        ),
        "",
        f"Failed requests during the swaps: {swap['swap_phase_failed']} "
        f"({swap['swap_phase_turns']} turns in {swap['swap_phase_s']} s, chat p99 "
        f"{swap['swap_phase_chat_p99_s']} s); both replicas back in rotation on {BASE_VERSION}: "
        f"{swap['all_back_in_rotation']}.",
    ]
    return "\n".join(rows)


def main() -> None:
    from engine.config import EngineConfig
    from engine.provision import is_checkpoint
    from engine.vllm_server import EmbeddedVLLMServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOL), help="checkpoint the replicas serve")
    parser.add_argument("--users", default="8,16,32", help="users levels, comma-separated")
    parser.add_argument("--seconds", type=float, default=60, help="load per level and config")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every level's pair")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="each replica's, on a CPU")
    parser.add_argument("--swap-users", type=int, default=8, help="users during the swaps")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--swap-gap", type=float, default=5, help="seconds between swaps")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny model, 4 users, 10 s, one swap: does the script work (no figures)",
    )
    args = parser.parse_args()
    levels = [int(u) for u in args.users.split(",")]
    max_model_len = 2048
    if args.smoke:
        levels, args.seconds, args.swaps, args.swap_users = [4], 10, 1, 4
        args.max_new_tokens, args.swap_gap, max_model_len = 8, 3, TINY_MAX_MODEL_LEN
    elif not is_checkpoint(Path(args.model)):
        raise SystemExit(
            f"no checkpoint at {args.model}: provision SmolLM2 with `.venv/bin/assistant "
            "provision`, or pass --model DIR (--smoke runs on a tiny model)"
        )

    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        work = Path(tmp)
        model = Path(args.model)
        if args.smoke:
            from harness.tiny_model import build_tiny_checkpoint

            model = build_tiny_checkpoint(work / "tiny")
        config = EngineConfig(
            max_model_len=max_model_len,
            max_num_seqs=max(64, 2 * max(levels)),  # one replica batches every user's pair
            compile="no",
            kv_cache_gib=args.kv_cache_gib,
        )
        environments = replica_environments(2)
        servers = [
            EmbeddedVLLMServer(
                str(model), config, work / f"r{i}.log", environment={**os.environ, **env}
            )
            for i, env in enumerate(environments, start=1)
        ]
        apps: dict[int, AppProcess] = {}
        try:
            for s in servers:
                s.start()
            for s in servers:
                s.wait_ready()
            urls = [s.url for s in servers]
            backlog = max(64, 2 * max(levels))
            for n in (1, 2):
                apps[n] = AppProcess(
                    app_args(urls[:n], model, max_model_len, args.max_new_tokens, backlog),
                    work / f"app{n}",
                    env={"ASSISTANT_ADMIN_TOKEN": ADMIN_TOKEN},
                ).start(timeout=600)
                run_load(apps[n].url, users=4, seconds=1, turns=1)  # first requests' costs

            phases = {(n, u): Phase(n, u) for n in (1, 2) for u in levels}
            for r in range(args.rounds):
                for i, users in enumerate(levels):
                    for n in (1, 2) if (i + r) % 2 == 0 else (2, 1):
                        measure(apps[n], urls[:n], users, args.seconds, phases[(n, users)])
            swap = swaps_under_load(apps[2], 2, args.swap_users, args.swaps, args.swap_gap)
        finally:
            for app in apps.values():
                app.stop()
            for s in servers:
                s.stop()

    print()
    print(table(levels, phases, swap))
    summary = {
        "model": "tiny" if args.smoke else Path(args.model).name,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "cores": len(os.sched_getaffinity(0)),
        "replica_environments": environments,
        "levels": {
            str(u): {
                "one": phases[(1, u)].summary(),
                "two": phases[(2, u)].summary(),
                "turns_per_min_ratio": ratio(
                    phases[(2, u)].summary()["turns_per_min"],
                    phases[(1, u)].summary()["turns_per_min"],
                ),
            }
            for u in levels
        },
        **swap,
    }
    print("REPLICAS " + json.dumps(summary))


if __name__ == "__main__":
    main()
