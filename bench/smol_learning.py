"""Does one cycle make SmolLM2 better for a user who votes consistently? Through the product.

`assistant run` on the embedded SmolLM2 (its own vLLM engine), a simulated user chats through
`POST /api/chat` and votes through `POST /api/vote` until it has cast `--votes` decisive votes (at
most that many: the issue's budget is "after <= 100 decisive votes"; or `--max-chats` chats), then
`POST /api/retrain` runs one cycle. If a version is deployed, it and v0 (after `POST
/api/rollback`) answer the same unseen prompts, two replies each, and the user judges
every (new, old) reply pair to the same prompt.

Preference families (`FAMILIES`), each a small function of the reply text that also insists on an
actual answer (it names the prompt's topic and has some substance: at least 12 words), so that a
collapse into "Honey." or a list of nothing cannot satisfy it. They were picked from what SmolLM2
does at 64 tokens (`--calibrate 128 --dump FILE`): properties its replies show in a quarter to
a half of samples, so that a user sees a difference in a third to a half of the pairs:
  - plain:        plain words: at most 2 words of 10 or more letters ("incredibly",
                  "prokaryotic", "sequestration")
  - opening:      gets to the point: the first sentence has at most 12 words
  - complete:     ends with a full stop, question or exclamation mark (not cut off mid-sentence)
Two earlier families were dropped because SmolLM2 at 64 tokens almost never differs on them
(decisive in 4-5 % of pairs): "concise" (8-30 words) and "prose" (no lists).

Degeneration checks against v0: share of on-topic replies, share of very short replies (< 5
words), distinct-2 over all replies, mean length in words.

Run: `.venv/bin/python -m bench.smol_learning --family plain --seed 1` (about 20 minutes on a
2-core CPU); `--calibrate 64` only samples v0 and reports how often each family is decisive.
`--retrain-config FILE` passes a cycle configuration to the app. Results: bench/RESULTS.md.
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
from collections.abc import Callable
from pathlib import Path

import httpx

from alignment.style_control import judge
from harness.app_process import DEPLOY_AT_THE_GATE, MANY_USERS_ON_ONE_ADDRESS, AppProcess

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / "data/models/SmolLM2-135M-Instruct"
TOKEN = "smol-learning-token"

TOPICS = [
    "gravity", "photosynthesis", "volcanoes", "rainbows", "tides", "earthquakes", "clouds",
    "magnets", "electricity", "vaccines", "bees", "whales", "deserts", "glaciers", "comets",
    "coral", "bacteria", "tornadoes", "thunder", "fossils", "planets", "the moon", "the sun",
    "oxygen", "water", "bread", "cheese", "coffee", "tea", "chocolate", "music", "poetry",
    "chess", "football", "bicycles", "trains", "airplanes", "rockets", "bridges", "computers",
    "the internet", "money", "banks", "forests", "rivers", "oceans", "mountains", "islands",
    "sleep", "dreams", "memory", "exercise", "gardening", "recycling", "batteries", "robots",
    "dinosaurs", "pyramids", "castles", "libraries",
]  # fmt: skip
TEMPLATES = [
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Tell me something interesting about {t}.",
    "Why does {t} matter?",
]
HELD_OUT_TOPICS = 16  # the last topics are never voted on


def topic_word(topic: str) -> str:
    return (
        topic.split()[-1].rstrip("s")[:6].lower()
    )  # "volcanoes" -> "volcan", "the moon" -> "moon"


def words(reply: str) -> list[str]:
    return reply.split()


def on_topic(reply: str, topic: str) -> bool:
    return topic_word(topic) in reply.lower()


LIST_LINE = re.compile(r"^\s*([-*•]|\d+[.)])\s", re.M)

FIRST_SENTENCE = re.compile(r"^(.*?[.!?])(\s|$)", re.S)


def first_sentence(reply: str) -> str:
    match = FIRST_SENTENCE.match(reply.strip())
    return match.group(1) if match else reply


def long_words(reply: str, letters: int = 10) -> int:
    return sum(len(w.strip(".,;:!?\"()'")) >= letters for w in words(reply))


def answers(reply: str, topic: str) -> bool:
    """Names the topic and has some substance: what every family also insists on."""
    return on_topic(reply, topic) and len(words(reply)) >= 12


FAMILIES: dict[str, Callable[[str, str], bool]] = {
    "plain": lambda r, t: answers(r, t) and long_words(r) <= 2,
    "opening": lambda r, t: answers(r, t) and len(words(first_sentence(r))) <= 12,
    "complete": lambda r, t: (
        on_topic(r, t) and len(words(r)) >= 5 and r.rstrip().endswith((".", "!", "?"))
    ),
}


def prompts(topics: list[str], rng: random.Random) -> list[tuple[str, str]]:
    out = [(tpl.format(t=t), t) for t in topics for tpl in TEMPLATES]
    rng.shuffle(out)
    return out


async def chat_many(app: AppProcess, items: list[tuple[str, str]], width: int = 8) -> list:
    gate = asyncio.Semaphore(width)
    async with httpx.AsyncClient(base_url=app.url, timeout=600) as client:

        async def one(item):
            async with gate:
                r = await client.post("/api/chat", json={"message": item[0]})
                r.raise_for_status()
                return item, r.json()

        return await asyncio.gather(*(one(i) for i in items))


def cast_vote(app: AppProcess, pair_id: str, a: bool, b: bool) -> str:
    """The simulated user's vote through `POST /api/vote`, from whether it likes A and B."""
    choice = "a" if a and not b else "b" if b and not a else "tie" if a else "both_bad"
    httpx.post(
        app.url + "/api/vote", json={"pair_id": pair_id, "choice": choice}
    ).raise_for_status()
    return choice


def retrain(app: AppProcess, headers: dict) -> tuple[dict, dict]:
    """One cycle through `POST /api/retrain`: its answer, and what every bench reports of it."""
    t0 = time.perf_counter()
    cycle = httpx.post(app.url + "/api/retrain?wait=true", headers=headers, timeout=3600).json()
    reward, gate = cycle.get("reward") or {}, cycle.get("gate") or {}
    return cycle, {
        "status": cycle["status"],
        "cycle_min": (time.perf_counter() - t0) / 60,
        "rm_heldout": reward.get("heldout_accuracy"),
        "rm_members": reward.get("member_heldout_accuracy"),
        "rm_n_heldout": reward.get("n_heldout"),
        "gate": {k: gate.get(k) for k in ("win_rate", "interval", "comparisons", "kl",
                                          "kl_per_token", "unsupported", "short_replies",
                                          "serving_short_replies", "support_tokens", "reason")},
        "ppo_short": [s.get("short") for s in cycle.get("ppo_steps") or []],
        "stage_s": cycle.get("seconds"),
        "budget": cycle.get("budget"),
    }  # fmt: skip


def v0_and_deployed(app: AppProcess, items: list[tuple[str, str]], headers: dict) -> tuple:
    """v0's and the deployed version's turns on the same prompts with the same seeds: the
    deployed version answers first, then v0 after `POST /api/rollback`."""
    after = asyncio.run(chat_many(app, items))
    httpx.post(
        app.url + "/api/rollback", json={"version": "v0000"}, headers=headers, timeout=600
    ).raise_for_status()
    return asyncio.run(chat_many(app, items)), after


def degeneration(replies: list[tuple[str, str]]) -> dict:
    """replies: (text, topic). On-topic share, very short share, distinct-2, mean words."""
    bigrams, total = set(), 0
    for text, _ in replies:
        w = words(text.lower())
        pairs = list(zip(w, w[1:], strict=False))
        bigrams.update(pairs)
        total += len(pairs)
    n = max(len(replies), 1)
    return {
        "on_topic": sum(on_topic(t, topic) for t, topic in replies) / n,
        "very_short": sum(len(words(t)) < 5 for t, _ in replies) / n,
        "distinct_2": len(bigrams) / max(total, 1),
        "mean_words": sum(len(words(t)) for t, _ in replies) / n,
    }


def calibrate(n_prompts: int, max_tokens: int, dump: Path | None = None) -> dict:
    """v0 only, no cycle: each family's liked share and decisive-vote rate on SmolLM2's own
    replies, to see which preferences a user could express at all at this reply length."""
    items = prompts(TOPICS, random.Random(0))[:n_prompts]
    args = ["--model", str(SMOL), "--max-new-tokens", str(max_tokens), "--no-cai",
            "--retrain-every-votes", "0", "--retrain-every-minutes", "0",
            *MANY_USERS_ON_ONE_ADDRESS, *DEPLOY_AT_THE_GATE]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        app = AppProcess(args, Path(tmp)).start()
        try:
            turns = asyncio.run(chat_many(app, items))
        finally:
            app.stop()
    out: dict = {"prompts": n_prompts, "max_new_tokens": max_tokens}
    for name, likes in FAMILIES.items():
        pairs = [[likes(c["text"], topic) for c in t["candidates"]] for (_, topic), t in turns]
        out[name] = {
            "liked": sum(map(sum, pairs)) / (2 * len(pairs)),
            "decisive_rate": sum(a != b for a, b in pairs) / len(pairs),
        }
    out["v0"] = degeneration([(c["text"], i[1]) for i, t in turns for c in t["candidates"]])
    if dump is not None:
        dump.write_text(json.dumps([[topic, [c["text"] for c in t["candidates"]]]
                                    for (_, topic), t in turns]))  # fmt: skip
    return out


def run(
    family: str,
    seed: int,
    votes: int,
    max_chats: int,
    config: Path | None,
    max_tokens: int,
    cai: bool = False,
):
    likes = FAMILIES[family]
    rng = random.Random(seed)
    vote_items = prompts(TOPICS[:-HELD_OUT_TOPICS], rng)
    test_items = prompts(TOPICS[-HELD_OUT_TOPICS:], random.Random(0))[:32]
    args = ["--model", str(SMOL), "--max-new-tokens", str(max_tokens),
            "--retrain-every-votes", "0", "--retrain-every-minutes", "0",
            "--reading-words-per-second", "0", "--max-votes-per-minute", "0",
            *MANY_USERS_ON_ONE_ADDRESS, *DEPLOY_AT_THE_GATE]  # fmt: skip
    if not cai:  # the critique worker off, unless the run measures the cycle beside it
        args.append("--no-cai")
    if config is not None:
        args += ["--retrain-config", str(config)]
    row: dict = {"family": family, "seed": seed, "cai": cai}
    with tempfile.TemporaryDirectory() as tmp:
        app = AppProcess(args, Path(tmp), env={"ASSISTANT_ADMIN_TOKEN": TOKEN}).start()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            decisive = chats = 0
            t0 = time.perf_counter()
            while decisive < votes and chats < max_chats:
                batch = [vote_items[(chats + i) % len(vote_items)] for i in range(16)]
                chats += len(batch)
                for (_, topic), turn in asyncio.run(chat_many(app, batch)):
                    if decisive == votes:  # the rest of the batch goes unvoted: at most `votes`
                        break
                    a, b = (likes(c["text"], topic) for c in turn["candidates"])
                    decisive += cast_vote(app, turn["pair_id"], a, b) in ("a", "b")
            row |= {"chats": chats, "votes": decisive, "chat_min": (time.perf_counter() - t0) / 60}
            cycle, summary = retrain(app, headers)
            row |= summary | {
                "ppo_kl": [round(s["kl"], 2) for s in cycle.get("ppo_steps", [])],
                "ppo_reward": [round(s["reward_mean"], 2) for s in cycle.get("ppo_steps", [])],
                # where PPO's minutes went: sampling, no-grad passes and scores, updates
                "ppo_s": {k: round(sum(s.get(f"{k}_s", 0.0) for s in cycle.get("ppo_steps", [])))
                          for k in ("rollout", "score", "update")},
            }  # fmt: skip
            if cycle["status"] != "deployed":
                return row
            before, after = v0_and_deployed(app, test_items, headers)
        finally:
            app.stop()
    wins = losses = 0
    liked = {"v0": 0, "new": 0}
    judged = []  # the decisive judgements, for the style-controlled win rate
    for ((_, topic), old), (_, new) in zip(before, after, strict=True):
        for o in old["candidates"]:
            for n in new["candidates"]:
                lo, ln = likes(o["text"], topic), likes(n["text"], topic)
                wins += ln and not lo
                losses += lo and not ln
                if ln != lo:
                    judged.append(
                        {"choice": "a" if ln else "b", "version_a": "new", "version_b": "v0",
                         "text_a": n["text"], "text_b": o["text"]}
                    )  # fmt: skip
        liked["v0"] += sum(likes(c["text"], topic) for c in old["candidates"])
        liked["new"] += sum(likes(c["text"], topic) for c in new["candidates"])
    n_replies = 2 * len(test_items)
    replies = lambda turns: [(c["text"], i[1]) for i, t in turns for c in t["candidates"]]  # noqa: E731
    row |= {
        "liked_v0": liked["v0"] / n_replies,
        "liked_new": liked["new"] / n_replies,
        "win_rate_vs_v0": wins / (wins + losses) if wins + losses else None,
        "decisive_comparisons": wins + losses,
        # the same judgements at equal reply length and markdown (alignment.style_control): a
        # gain that is only length shows here as one that disappears (`style_note`)
        "style_vs_v0": judge(judged, "new", "v0").as_dict() if judged else None,
        "v0": degeneration(replies(before)),
        "new": degeneration(replies(after)),
        "examples": [c["text"] for _, t in after[:3] for c in t["candidates"][:1]],
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="plain")
    parser.add_argument("--seed", type=int, nargs="+", default=[1])
    parser.add_argument("--votes", type=int, default=100, help="decisive votes before the cycle")
    parser.add_argument("--max-chats", type=int, default=320)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="reply length users see")
    parser.add_argument("--retrain-config", type=Path, default=None)
    parser.add_argument(
        "--cai", action="store_true", help="keep the critique worker on (it yields to cycles)"
    )
    parser.add_argument(
        "--calibrate", type=int, default=0, metavar="N",
        help="only sample v0 on N prompts and report each family's liked and decisive rates",
    )  # fmt: skip
    parser.add_argument("--dump", type=Path, default=None, help="with --calibrate: save replies")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.calibrate:
        print(json.dumps(calibrate(args.calibrate, args.max_new_tokens, args.dump)), flush=True)
        return
    for seed in args.seed:
        row = run(
            args.family, seed, args.votes, args.max_chats, args.retrain_config,
            args.max_new_tokens, args.cai,
        )  # fmt: skip
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
