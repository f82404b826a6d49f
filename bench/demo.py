"""`make demo`: watch the loop learn, on the CPU, in a few minutes.

A tiny model that answers in one of two styles, half and half (plain, or cheerful with a "!"), is
served by the real product (`assistant run`, its own vLLM engine, DuckDB, the worker, the
hot-swap) on http://127.0.0.1:7860 (`--port`). Simulated users who like the cheerful style chat
and vote through the API while you watch the page (and vote too, if you like); then one retrain
cycle runs, and the demo prints how often the users liked the replies before and after, on
prompts nobody voted on. If the gate kept the old version, it says so and why. The app keeps
running afterwards until Ctrl-C (`--exit` to stop at once). Its data lives in `data/demo/`, apart
from yours.

It lives beside the benchmarks because it shares their simulated users and the learning test's
two-style model; it is the learning test with the page open.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

from harness.app_process import DEPLOY_AT_THE_GATE, MANY_USERS_ON_ONE_ADDRESS, AppProcess
from harness.tiny_model import (
    TOPICS,
    TWO_STYLE_RETRAIN_CONFIG,
    build_two_style_checkpoint,
    likes_cheerful,
)

REPO = Path(__file__).resolve().parents[1]


async def chats(url: str, messages: list[str]) -> list[dict]:
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(message: str) -> dict:
            async with gate:
                r = await client.post("/api/chat", json={"message": message})
                r.raise_for_status()
                return r.json()

        return await asyncio.gather(*(one(m) for m in messages))


def liked_share(turns: list[dict]) -> float:
    replies = [c["text"] for t in turns for c in t["candidates"]]
    return sum(map(likes_cheerful, replies)) / len(replies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--chats", type=int, default=128, help="chats the simulated users vote on")
    parser.add_argument("--exit", action="store_true", help="stop the app when the demo is done")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    say = lambda text: print(f"[demo] {text}", flush=True)  # noqa: E731

    model = args.data_dir / "two-style-model"
    if not (model / "config.json").exists():
        say("teaching a tiny model two reply styles (about a minute, once) ...")
        build_two_style_checkpoint(model)
    config = args.data_dir / "retrain.json"
    config.write_text(json.dumps(TWO_STYLE_RETRAIN_CONFIG))
    say("starting the app and its engine ...")
    app = AppProcess(
        [
            "--model", str(model), "--max-model-len", "512", "--max-new-tokens", "16",
            "--temperature", "1.0", "--no-cai", "--reading-words-per-second", "0",
            "--max-votes-per-minute", "0", "--retrain-every-votes", "0",
            "--retrain-every-minutes", "0", "--retrain-config", str(config),
            *MANY_USERS_ON_ONE_ADDRESS, *DEPLOY_AT_THE_GATE,
        ],
        args.data_dir / "app",
        port=args.port,
    ).start(timeout=600)  # fmt: skip
    try:
        say(f"open {app.url} to watch: simulated users who like cheerful replies are voting")
        rng = random.Random()
        voting = [f"Tell me about {rng.choice(TOPICS)} ({i})." for i in range(args.chats)]
        decisive = 0
        for turn in asyncio.run(chats(app.url, voting)):
            a, b = (likes_cheerful(c["text"]) for c in turn["candidates"])
            choice = "a" if a and not b else "b" if b and not a else "tie"
            decisive += choice != "tie"
            httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": choice})
        held_out = [f"Tell me about {t} (held out {i})." for i in range(2) for t in TOPICS]
        before = liked_share(asyncio.run(chats(app.url, held_out)))
        say(f"{decisive} decisive votes; v0's replies are liked {before:.2f} of the time")
        say("retraining: reward models, PPO with KL on LoRA, the gate (a minute or two) ...")
        cycle = httpx.post(
            app.url + "/api/retrain?wait=true", headers=app.admin_headers(), timeout=1800
        ).json()
        gate = cycle.get("gate") or {}
        if cycle.get("status") != "deployed":
            say(
                f"no gain shown: the cycle ended {cycle.get('status')} "
                f"({cycle.get('reason') or cycle.get('error')}); the serving version stays"
            )
        else:
            after = liked_share(asyncio.run(chats(app.url, held_out)))
            verdict = "a gain" if after > before else "no gain"
            say(
                f"{cycle['version']} is serving: liked {before:.2f} -> {after:.2f} on prompts "
                f"nobody voted on ({verdict}); gate win rate {gate.get('win_rate'):.2f} on "
                f"{gate.get('comparisons')} comparisons, KL {gate.get('kl'):.2f}"
            )
        if args.exit:
            return 0
        say(f"the app keeps running at {app.url}; Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    finally:
        app.stop()


if __name__ == "__main__":
    sys.exit(main())
