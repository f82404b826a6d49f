"""Canary pair latency: a pair with one reply from a challenger against an ordinary pair.

Two ways to serve the challenger next to the serving version, measured in one run on the same
prompts with the same fixed reply length (`ignore_eos`), interleaved so drift hits both alike:

1. **adapter** (what the app does): the challenger is the cycle's LoRA adapter, loaded in the
   serving engine; a canary pair is two requests, base and adapter, in one engine
   (`VLLMServerEngine.stream_pair(..., challenger=...)`, the app's code path).
2. **second engine**: the challenger's merged weights in a second vLLM process; a canary pair is
   one request to each engine.

Reported: time to both replies complete, median over the prompts, for one user at a time and for
4 users at once, as a ratio to the ordinary pair (one request, n=2) measured in the same run.

Run: `.venv/bin/python -m bench.canary` (about 6 minutes on 2 cores). Prints a Markdown table.
`--repeat-test N` instead runs the canary test N times and prints the votes each verdict took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from alignment.config import PPOConfig
from assistant.config import EngineConfig
from bench.generation import PROMPTS
from engine.protocol import Challenger
from engine.vllm_client import VLLMServerEngine
from engine.vllm_server import EmbeddedVLLMServer

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / "data" / "models" / "SmolLM2-135M-Instruct"


def make_adapter(model: str, out: Path) -> Path:
    """A LoRA adapter shaped like the cycle's (PPO's rank, all linear layers), nudged off zero
    so the engine really applies it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ppo = PPOConfig()
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(
        r=ppo.lora_rank, lora_alpha=ppo.lora_alpha, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft = get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    peft.save_pretrained(out)
    return out


async def _timed(make_pair, users: int, rounds: int) -> list[float]:
    gate = asyncio.Semaphore(users)
    times: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            t = time.perf_counter()
            await make_pair(PROMPTS[i % len(PROMPTS)], i)
            times.append(time.perf_counter() - t)

    await asyncio.gather(*(one(i) for i in range(rounds * len(PROMPTS))))
    return times


async def measure(url: str, second_url: str | None, tokens: int, rounds: int) -> list[dict]:
    sampling = {"max_tokens": tokens, "temperature": 0.7, "top_p": 0.95, "ignore_eos": True}
    engine = VLLMServerEngine(url, "policy", "v0000")
    rows = []

    async def drain(stream) -> None:
        async for _ in stream:
            pass

    async def ordinary(prompt: str, i: int) -> None:
        await drain(engine.stream_pair([{"role": "user", "content": prompt}], sampling, i))

    async def adapter(prompt: str, i: int) -> None:
        messages = [{"role": "user", "content": prompt}]
        await drain(engine.stream_pair(messages, sampling, i, Challenger("v0001", i % 2)))

    async def two_engines(prompt: str, i: int) -> None:
        body = {"model": "policy", "messages": [{"role": "user", "content": prompt}], "n": 1,
                "seed": i, **sampling}  # fmt: skip
        async with httpx.AsyncClient(timeout=600) as http:
            await asyncio.gather(
                http.post(url + "/v1/chat/completions", json=body),
                http.post(second_url + "/v1/chat/completions", json=body),
            )

    kinds = {"ordinary pair (n=2)": ordinary, "canary pair, adapter": adapter}
    if second_url:
        kinds["canary pair, second engine"] = two_engines
    for users in (1, 4):
        medians = {k: [] for k in kinds}
        for _ in range(rounds):  # interleaved: each kind once per round
            for name, fn in kinds.items():
                medians[name] += await _timed(fn, users, 1)
        base = statistics.median(medians["ordinary pair (n=2)"])
        for name, times in medians.items():
            med = statistics.median(times)
            rows.append({"users": users, "kind": name, "median_s": med, "ratio": med / base})
    await engine.aclose()
    return rows


def repeat_canary_test(n: int) -> int:
    """Run the canary test (`tests/test_canary.py`: a worse challenger retired, a better one
    promoted, through the app) n times; one line per case and run with the votes it took."""
    import json
    import platform
    import re

    from bench.learning import run_test_file

    failures = 0
    for i in range(1, n + 1):
        started = time.perf_counter()
        returncode, out = run_test_file("tests/test_canary.py")
        failures += returncode != 0
        for case, line in re.findall(r"^CANARY-(WORSE|BETTER) (.*)$", out, re.M):
            c = json.loads(line)
            v = c["votes"]
            print(
                f"| {i} | {case.lower()} | {c['decision']} | {c['canary_pairs']} of "
                f"{c['turns']} | {v['challenger']} / {v['serving']} / {v['tie']} | "
                f"{c['win_rate']:.2f} [{c['interval'][0]:.2f}, {c['interval'][1]:.2f}] |",
                flush=True,
            )
        print(f"run {i}: rc {returncode}, {time.perf_counter() - started:.0f} s", flush=True)
        if returncode:  # where it failed (pytest's E lines and test frames), then the tail
            where = [line for line in out.splitlines() if line.startswith(("E ", "tests/"))]
            print("\n".join(where[:40]), "\n...\n", out[-2000:], flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\ncanary test: {n - failures}/{n} passed ({machine})")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOL))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-second-engine", action="store_true")
    parser.add_argument(
        "--repeat-test", type=int, default=0,
        help="instead: run tests/test_canary.py N times, printing the votes each verdict took",
    )  # fmt: skip
    args = parser.parse_args()
    if args.repeat_test:
        raise SystemExit(repeat_canary_test(args.repeat_test))
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = make_adapter(args.model, Path(tmp) / "adapter")
        first = EmbeddedVLLMServer(args.model, EngineConfig(), Path(tmp) / "engine.log")
        first.start()
        second = None
        try:
            first.wait_ready()
            engine = VLLMServerEngine(first.url, "policy", "v0000")
            asyncio.run(engine.load_adapter("v0001", str(adapter_dir)))
            if not args.no_second_engine:
                second = EmbeddedVLLMServer(
                    args.model, EngineConfig(lora_rollouts=False), Path(tmp) / "engine2.log"
                )
                second.start()
                second.wait_ready()
            rows = asyncio.run(
                measure(first.url, second.url if second else None, args.tokens, args.rounds)
            )
        finally:
            first.stop()
            if second is not None:
                second.stop()
    print(f"\n{args.tokens}-token replies, {args.rounds} rounds of {len(PROMPTS)} prompts\n")
    print("| users at once | pair | median s to both replies | ratio to ordinary |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['users']} | {r['kind']} | {r['median_s']:.2f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
