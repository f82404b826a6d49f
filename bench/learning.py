"""Learning efficiency: how many votes until the deployed version wins the user's preference
70% of the time against v0?

A simulated user with a known preference votes on pairs sampled from v0 (decisive only when
exactly one candidate has the property, "tie" otherwise). For each vote budget a fresh cycle runs
from v0 (reward model -> PPO -> gate -> merge); the deployed version then answers held-out prompts
with the same seeds as v0, the user compares the two replies to each prompt, and we report the
deployed version's win rate over the decisive comparisons, the share of liked replies, and the KL.

Default: the tiny model taught two reply styles half and half (`build_two_style_checkpoint`);
the user likes the cheerful one. `--smol`: SmolLM2 itself, preference "at most 30 words", one
vote budget (about 10 minutes on a 2-core CPU).

Run: `.venv/bin/python -m bench.learning` (about 10 minutes) or `... -m bench.learning --smol`.
`--repeat N` instead runs the learning test (`tests/test_learning.py`, through the app) N times in
fresh processes and prints the tally, each failure classified: rejected by the gate (safe) or a
deployed version that was not better (the failure the gate exists to prevent); and the second
cycle's tally (the loop's next turn: a version no worse than the first, or a refusal).
Results: bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from alignment.config import CycleConfig, GateConfig, PPOConfig, RewardConfig, cycle_config
from alignment.cycle import CycleInputs, run_cycle
from alignment.rollouts import vllm_generate
from engine.vllm_client import VLLMServerEngine
from storage.export import to_trl

REPO = Path(__file__).resolve().parents[1]
VOTE_BUDGETS = (2, 4, 6, 8, 16, 32, 64)  # chats voted on (about half are decisive at v0)
SEEDS = (1, 2, 3)
HELD_OUT = 32  # prompts, two replies each


async def sample_pairs(url, version, prompts, seed0, max_tokens):
    engine = VLLMServerEngine(url, "policy", version)
    sampling = {"temperature": 1.0, "max_tokens": max_tokens}

    async def one(i, p):
        final = [u async for u in engine.stream_pair(p, sampling, seed0 + 2 * i)][-1]
        return p, [c.text for c in final.candidates]

    try:
        out = []
        for start in range(0, len(prompts), 16):  # 16 at a time: the engine batches them
            chunk = list(enumerate(prompts))[start : start + 16]
            out += await asyncio.gather(*(one(i, p) for i, p in chunk))
        return out
    finally:
        await engine.aclose()


def preference_records(pairs, likes: Callable[[str], bool]) -> list[dict]:
    """The simulated user's decisive votes, in the export's TRL shape (`storage.export`)."""
    rows = (
        {"prompt": p, "text_a": a, "text_b": b, "choice": "a" if likes(a) else "b"}
        for p, (a, b) in pairs
        if likes(a) != likes(b)
    )
    return [to_trl(row) for row in rows]


def compare(before, after, likes) -> dict:
    """The user's verdict between v0's and the new version's reply to each held-out prompt."""
    wins = losses = 0
    for (_, old), (_, new) in zip(before, after, strict=True):
        for o, n in zip(old, new, strict=True):
            wins += likes(n) and not likes(o)
            losses += likes(o) and not likes(n)
    liked = lambda pairs: sum(likes(r) for _, rs in pairs for r in rs) / (2 * len(pairs))  # noqa: E731
    return {
        "win_rate_vs_v0": wins / (wins + losses) if wins + losses else None,
        "decisive_comparisons": wins + losses,
        "liked_v0": liked(before),
        "liked_new": liked(after),
    }


def one_budget(url, model, work, config, prompts, likes, n_chats, seed, max_tokens) -> dict:
    pairs = asyncio.run(sample_pairs(url, "v0000", prompts[:n_chats], 1000 * seed, max_tokens))
    records = preference_records(pairs, likes)
    row = {"chats": n_chats, "seed": seed, "decisive_votes": len(records)}
    if len(records) < 2:
        return {**row, "status": "too few decisive votes"}
    config.reward.seed = config.ppo.seed = seed
    started = time.perf_counter()
    inputs = CycleInputs(
        serving_model=str(model),
        parent_version="v0000",
        new_version="v0001",
        records=records,
        prompts=[p for p, _ in pairs],
        serving_generate=vllm_generate(url, adapters_dir=work / f"adapters-{n_chats}-{seed}"),
        out_root=work / f"run-{n_chats}-{seed}",
        config=config,
    )
    result = run_cycle(inputs)
    row |= {
        "cycle_s": round(time.perf_counter() - started, 1),
        "rm_heldout_acc": result.reward.get("heldout_accuracy"),
        "gate_win_rate": result.gate["win_rate"],
        "kl": result.gate["kl"],
    }
    if not result.gate["deploy"]:
        return {**row, "status": "rejected: " + result.gate["reason"]}

    async def held_out():
        engine = VLLMServerEngine(url, "policy", "v0000")
        test = prompts[len(prompts) - HELD_OUT :]
        try:
            before = await sample_pairs(url, "v0000", test, 77_000, max_tokens)
            await engine.reload_weights(result.path, "v0001")
            after = await sample_pairs(url, "v0001", test, 77_000, max_tokens)
        finally:
            await engine.reload_weights(str(model), "v0000")
            await engine.aclose()
        return before, after

    before, after = asyncio.run(held_out())
    return {**row, "status": "deployed", **compare(before, after, likes)}


def smol_config() -> CycleConfig:
    return CycleConfig(
        reward=RewardConfig(learning_rate=2e-4, epochs=2, batch_size=8, max_length=512),
        ppo=PPOConfig(
            steps=8,
            prompts_per_step=8,
            max_new_tokens=48,
            minibatch_size=4,
            ppo_epochs=2,
            learning_rate=1e-4,
        ),
        gate=GateConfig(eval_prompts=8, max_new_tokens=48, min_win_rate=0.0, max_kl=20.0),
    )


def run_test_file(path: str) -> tuple[int, str]:
    """One run of a test file in its own pytest process, as CI runs it: (exit code, output)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", path],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def repeat_learning_test(n: int) -> int:
    """Run the learning test n times; print one line per run and the tally. Exit code 1 if any
    run failed."""
    import platform
    import re

    tally = {"passed": 0, "rejected by the gate": 0, "deployed, not better": 0, "error": 0}
    second_tally = {"passed": 0, "failed": 0, "deployed": 0, "refused": 0}
    for i in range(1, n + 1):
        started = time.perf_counter()
        returncode, out = run_test_file("tests/test_learning.py")
        cycle = re.search(r"^LEARNING-CYCLE (.*)$", out, re.M)
        result = re.search(r"^LEARNING-RESULT (.*)$", out, re.M)
        second = re.search(r"SECOND-CYCLE (\{.*)$", out, re.M)
        second_failed = "FAILED tests/test_learning.py::test_a_second_cycle" in out
        second_tally["failed" if second_failed or not second else "passed"] += 1
        if second:
            second = json.loads(second.group(1))
            second_tally["deployed" if second["status"] == "deployed" else "refused"] += 1
        first_failed = "FAILED tests/test_learning.py::test_deployed_version" in out
        if returncode == 0 or (result and not first_failed):
            kind = "passed"
        elif cycle and json.loads(cycle.group(1))["status"] != "deployed":
            kind = "rejected by the gate"
        elif result:
            kind = "deployed, not better"
        else:
            kind = "error"
        tally[kind] += 1
        gate = json.loads(cycle.group(1))["gate"] if cycle else {}
        measured = json.loads(result.group(1)) if result else {}
        print(
            json.dumps(
                {"run": i, "outcome": kind, "seconds": round(time.perf_counter() - started),
                 **measured, "gate_win_rate": gate.get("win_rate"),
                 "gate_interval": gate.get("interval"), "gate_n": gate.get("comparisons"),
                 "kl": gate.get("kl"), "reason": gate.get("reason"),
                 "second_cycle": second, "second_failed": second_failed}
            ),
            flush=True,
        )  # fmt: skip
        if kind == "error":
            print(out[-3000:], flush=True)
    print(
        f"\nlearning test: {tally['passed']}/{n} passed; "
        + ", ".join(f"{k}: {v}" for k, v in tally.items() if k != "passed")
        + f" ({platform.machine()}, {os.cpu_count()} cores)"
    )
    print(
        f"second cycle: {second_tally['passed']}/{n} passed ({second_tally['deployed']} "
        f"deployed a version, {second_tally['refused']} refused)"
    )
    return 0 if tally["passed"] == second_tally["passed"] == n else 1


def main() -> None:
    import argparse

    from assistant.config import EngineConfig
    from engine.vllm_server import EmbeddedVLLMServer
    from harness.tiny_model import (
        TOPICS,
        TWO_STYLE_RETRAIN_CONFIG,
        build_two_style_checkpoint,
        likes_cheerful,
        topic_prompt,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smol", action="store_true", help="SmolLM2, 'at most 30 words'")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(VOTE_BUDGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--override",
        type=json.loads,
        default={},
        help='JSON merged into the two-style retrain config, e.g. \'{"ppo": {"steps": 12}}\'',
    )
    parser.add_argument(
        "--repeat", type=int, default=0, help="run the learning test N times and tally it"
    )
    args = parser.parse_args()
    if args.repeat:
        raise SystemExit(repeat_learning_test(args.repeat))
    smol = args.smol
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if smol:
            model = REPO / "data/models/SmolLM2-135M-Instruct"
            budgets, seeds, max_tokens, max_len = (160,), (1,), 48, 2048
            make_config = smol_config

            def likes(reply: str) -> bool:
                return len(reply.split()) <= 30
        else:
            model = build_two_style_checkpoint(work / "two-style")
            budgets, seeds, max_tokens, max_len = args.budgets, args.seeds, 16, 512

            overrides = {
                section: {**TWO_STYLE_RETRAIN_CONFIG.get(section, {}), **values}
                for section, values in {**TWO_STYLE_RETRAIN_CONFIG, **args.override}.items()
            }

            def make_config() -> CycleConfig:
                return cycle_config("default", overrides)

            likes = likes_cheerful
        n = max(budgets) + HELD_OUT
        prompts = [topic_prompt(TOPICS[i % len(TOPICS)], i // len(TOPICS)) for i in range(n)]
        engine = EmbeddedVLLMServer(
            str(model), EngineConfig(max_model_len=max_len, compile="no"), work / "engine.log"
        )
        engine.start()
        rows = []
        try:
            engine.wait_ready()
            for seed in seeds:
                for n_chats in budgets:
                    row = one_budget(
                        engine.url,
                        model,
                        work,
                        make_config(),
                        prompts,
                        likes,
                        n_chats,
                        seed,
                        max_tokens,
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            engine.stop()
    print("\n| chats voted | seed | decisive votes | RM held-out acc | KL | liked v0 -> new "
          "| win rate vs v0 |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        if r["status"] != "deployed":
            print(f"| {r['chats']} | {r['seed']} | {r['decisive_votes']} | {r['status']} |")
            continue
        win = r["win_rate_vs_v0"]
        print(
            f"| {r['chats']} | {r['seed']} | {r['decisive_votes']} | {r['rm_heldout_acc']} "
            f"| {r['kl']:.2f} | {r['liked_v0']:.2f} -> {r['liked_new']:.2f} "
            f"| {'-' if win is None else f'{win:.2f}'} |"
        )


if __name__ == "__main__":
    main()
