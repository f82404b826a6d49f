"""Does SFT on what users wrote themselves move SmolLM2 towards it? Through the product.

A simulated user dislikes replies cut off mid-sentence (the `complete` family of
`bench.smol_learning`: on topic, at least 5 words, ends with . ! or ?). When one candidate is
complete and the other is not, it votes; when **both are bad**, it does what the page offers
("Both bad? Write the reply you wanted"): it edits candidate A into the short reply it wanted, the
whole sentences from A's start up to about 30 words, and sends it with `POST /api/demonstration`.
That is about seven turns in ten on SmolLM2 at 64 tokens, so the cycle has far more
demonstrations than decisive votes, which is the situation SFT is for.

Then one cycle (`POST /api/retrain`) with the SFT stage on (`assistant run --sft`). By default
PPO is switched off in that cycle (`--ppo-steps 0`, the rest of the default preset unchanged),
so that any change is SFT's: the gate still compares the SFT model with v0 on the reward models
trained on the votes, and deploys it only if it wins. `--ppo-steps -1` keeps the preset's PPO.

Measured on 32 unseen prompts x 2 replies, v0 and the new version with the same seeds:
  - kept: the share of a reply's words the user keeps when editing it into their own reply
    (1.0 = the user would not change a word; what "closer to what they wrote" means here)
  - words: mean reply length against the mean length of the user's demonstrations
  - complete: the share the user would have accepted as is
  - the degeneration checks of `bench.smol_learning` (on topic, very short, distinct-2)

Run: `.venv/bin/python -m bench.demonstration_learning --seed 1` (about 15 minutes on a 2-core
CPU). Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import httpx

from bench.smol_learning import (
    FAMILIES,
    HELD_OUT_TOPICS,
    SMOL,
    TOKEN,
    TOPICS,
    cast_vote,
    chat_many,
    degeneration,
    prompts,
    retrain,
    v0_and_deployed,
    words,
)
from harness.app_process import DEPLOY_AT_THE_GATE, MANY_USERS_ON_ONE_ADDRESS, AppProcess

SENTENCE = re.compile(r"[^.!?]*[.!?]+(?=\s|$)")
LIKES = FAMILIES["complete"]


def users_edit(reply: str, cap: int = 30) -> str:
    """The reply this user wanted from `reply`: its whole sentences from the start, stopping
    before the one that would take it past `cap` words (the first is always kept)."""
    kept: list[str] = []
    for match in SENTENCE.finditer(reply.strip()):
        sentence = match.group(0).strip()
        if kept and len(words(" ".join([*kept, sentence]))) > cap:
            break
        kept.append(sentence)
    return " ".join(kept)


def kept_share(reply: str) -> float:
    """Share of the reply's words that survive the user's edit."""
    return len(words(users_edit(reply))) / max(1, len(words(reply)))


def measure(turns: list) -> dict:
    replies = [(c["text"], item[1]) for item, t in turns for c in t["candidates"]]
    n = max(1, len(replies))
    return {
        "kept": sum(kept_share(text) for text, _ in replies) / n,
        "complete": sum(LIKES(text, topic) for text, topic in replies) / n,
        **degeneration(replies),
    }


def run(seed: int, chats_wanted: int, ppo_steps: int, sft_lr: float | None) -> dict:
    rng = random.Random(seed)
    vote_items = prompts(TOPICS[:-HELD_OUT_TOPICS], rng)
    test_items = prompts(TOPICS[-HELD_OUT_TOPICS:], random.Random(0))[:32]
    overrides: dict = {}
    if ppo_steps >= 0:
        overrides["ppo"] = {"steps": ppo_steps}
    if sft_lr is not None:
        overrides["sft"] = {"learning_rate": sft_lr}
    row: dict = {"seed": seed, "ppo_steps": ppo_steps, "sft_lr": sft_lr}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "retrain.json"
        config.write_text(json.dumps(overrides))
        args = ["--model", str(SMOL), "--max-new-tokens", "64", "--sft", "--no-cai",
                "--retrain-every-votes", "0", "--retrain-every-minutes", "0",
                "--reading-words-per-second", "0", "--max-votes-per-minute", "0",
                "--retrain-config", str(config),
                *MANY_USERS_ON_ONE_ADDRESS, *DEPLOY_AT_THE_GATE]  # fmt: skip
        app = AppProcess(args, Path(tmp), env={"ASSISTANT_ADMIN_TOKEN": TOKEN}).start()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            votes = demos = chats = 0
            demo_words: list[int] = []
            t0 = time.perf_counter()
            while chats < chats_wanted:
                batch = [vote_items[(chats + i) % len(vote_items)] for i in range(16)]
                chats += len(batch)
                for (_, topic), turn in asyncio.run(chat_many(app, batch)):
                    a, b = (LIKES(c["text"], topic) for c in turn["candidates"])
                    edit = users_edit(turn["candidates"][0]["text"])
                    if not a and not b and len(words(edit)) >= 5:
                        demos += 1
                        demo_words.append(len(words(edit)))
                        httpx.post(
                            app.url + "/api/demonstration",
                            json={"pair_id": turn["pair_id"], "text": edit},
                        ).raise_for_status()
                        continue
                    votes += cast_vote(app, turn["pair_id"], a, b) in ("a", "b")
            row |= {
                "chats": chats,
                "votes": votes,
                "demonstrations": demos,
                "demo_words": sum(demo_words) / max(1, len(demo_words)),
                "chat_min": (time.perf_counter() - t0) / 60,
            }
            cycle, summary = retrain(app, headers)
            row |= summary | {"sft": cycle.get("sft")}
            if cycle["status"] != "deployed":
                return row
            before, after = v0_and_deployed(app, test_items, headers)
        finally:
            app.stop()
    row |= {
        "v0": measure(before),
        "new": measure(after),
        "examples": [t["candidates"][0]["text"] for _, t in after[:3]],
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[1])
    parser.add_argument("--chats", type=int, default=192, help="chats before the cycle")
    parser.add_argument(
        "--ppo-steps", type=int, default=0, help="PPO rounds in the cycle (-1: the preset's)"
    )
    parser.add_argument("--sft-lr", type=float, default=None, help="SFT learning rate override")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for seed in args.seed:
        row = run(seed, args.chats, args.ppo_steps, args.sft_lr)
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
