"""Several cycles in a row, for one user or a crowd: is each version better than the last?

`assistant run` on the embedded SmolLM2 with the canary on (the product's defaults unless a flag
below says otherwise). Simulated voters, each with its own session (`POST /api/session`) and
address (`X-Forwarded-For`, through `--forwarded-allow-ips 127.0.0.1`), chat through `POST
/api/chat` and vote through `POST /api/vote` on whatever serves: the serving version's pairs and,
while a canary runs, the challenger-against-serving pairs that decide it. A cycle starts (`POST
/api/retrain`) after `--votes` decisive votes since the last one, once no canary runs; a
challenger is voted on until the canary promotes or retires it. Then the next cycle.

Crowds (`--crowd`; `--family` is the majority's taste, `--other` the second one):
  - one:       one voter, no noise (the learning test's user, on SmolLM2)
  - noise:     five voters of `--family`, each picking at random on 25 % of decisive pairs
  - mix:       six voters of `--family`, four of `--other` (a 60/40 crowd)
  - minority:  eight voters of `--family`, two voting the opposite of it
  - drift:     one voter whose taste is `--family` until the first cycle, `--other` from then
               on (its canary is judged by the new taste)

After the last cycle every version that served (and v0) answers the same held-out prompts
(after `POST /api/rollback` to it), and each is judged against its predecessor and against v0
by the noise-free tastes (both, for `mix` and `drift`). Per version: the KL to v0 (sum over the
reply of log p_version - log p_v0 on the version's own samples at temperature 1, with
transformers, as the gate measures it against the serving version), the gate's limit beside it,
and the degeneration figures of `bench.smol_learning`.

Run: `.venv/bin/python -m bench.smol_cycles --family plain --crowd one --cycles 3 --seed 1`
(hours on a 2-core CPU: run it alone). One JSON line per seed. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from alignment.config import GateConfig
from bench.smol_learning import (
    FAMILIES,
    HELD_OUT_TOPICS,
    SMOL,
    TOPICS,
    degeneration,
    prompts,
    retrain,
)
from harness.app_process import MANY_USERS_ON_ONE_ADDRESS, AppProcess

TOKEN = "smol-cycles-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
Taste = Callable[[str, str], bool]


@dataclass
class Voter:
    """One simulated person: a taste (which may change), an error rate, an address."""

    name: str
    taste: str  # a FAMILIES key, or "not:<key>" for someone who wants the opposite
    noise: float
    address: str
    rng: random.Random
    session: str | None = None
    decisive: int = field(default=0)

    def likes(self, text: str, topic: str) -> bool:
        family = self.taste.removeprefix("not:")
        liked = FAMILIES[family](text, topic)
        return not liked if self.taste.startswith("not:") else liked

    def choice(self, a: str, b: str, topic: str) -> str:
        la, lb = self.likes(a, topic), self.likes(b, topic)
        if la != lb and self.rng.random() < self.noise:
            return self.rng.choice("ab")  # a careless click
        return "a" if la and not lb else "b" if lb and not la else "tie" if la else "both_bad"


def crowd(kind: str, family: str, other: str, seed: int) -> list[Voter]:
    rng = random.Random(seed)
    make = lambda i, taste, noise=0.0: Voter(  # noqa: E731
        f"voter-{i}", taste, noise, f"127.0.1.{i + 1}", random.Random(rng.random())
    )
    if kind in ("one", "drift"):
        return [make(0, family)]
    if kind == "noise":
        return [make(i, family, 0.25) for i in range(5)]
    if kind == "mix":
        return [make(i, family if i < 6 else other) for i in range(10)]
    if kind == "minority":
        return [make(i, family if i < 8 else f"not:{family}") for i in range(10)]
    raise ValueError(f"unknown crowd {kind!r}")


async def _chat_and_vote(app: AppProcess, voters: list[Voter], items: list[tuple[str, str]]):
    """Each item chatted by the next voter in turn, 8 at a time; each voter votes on its own
    pairs from its own session and address. Returns (the pair's versions, choice) per item."""
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=app.url, timeout=900) as client:
        for v in voters:
            if v.session is None:
                r = await client.post("/api/session", headers={"X-Forwarded-For": v.address})
                r.raise_for_status()
                v.session = r.json()["session_id"]

        async def one(i: int, item: tuple[str, str]):
            voter = voters[i % len(voters)]
            headers = {"X-Forwarded-For": voter.address, "X-Session-Id": voter.session}
            async with gate:
                r = await client.post("/api/chat", json={"message": item[0]}, headers=headers)
                r.raise_for_status()
                turn = r.json()
            a, b = (c["text"] for c in turn["candidates"])
            choice = voter.choice(a, b, item[1])
            vote = {"pair_id": turn["pair_id"], "choice": choice}
            answer = await client.post("/api/vote", json=vote, headers=headers)
            answer.raise_for_status()
            voter.decisive += choice in ("a", "b")
            return answer.json()["versions"], choice

        return await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))


def _get(app: AppProcess, route: str) -> dict:
    return httpx.get(app.url + route, headers=HEADERS, timeout=60).json()


class Session:
    """The app, its voters, and where they are in the prompt list."""

    def __init__(self, app: AppProcess, voters: list[Voter], items: list[tuple[str, str]]):
        self.app, self.voters, self.items, self.next = app, voters, items, 0
        self.chats = 0
        self.canary_pairs = 0

    def batch(self, n: int = 16) -> int:
        """n chats and votes; returns the decisive votes among them."""
        items = [self.items[(self.next + i) % len(self.items)] for i in range(n)]
        self.next += n
        self.chats += n
        done = asyncio.run(_chat_and_vote(self.app, self.voters, items))
        self.canary_pairs += sum(versions["a"] != versions["b"] for versions, _ in done)
        return sum(choice in ("a", "b") for _, choice in done)

    def canary_running(self) -> bool:
        return _get(self.app, "/api/canary").get("decision") == "running"


def _replies(app: AppProcess, items: list[tuple[str, str]], version: str) -> list[dict]:
    """`version`'s two replies to each held-out prompt (after a rollback to it)."""
    serving = _get(app, "/api/versions")["serving"]
    if serving != version:
        httpx.post(
            app.url + "/api/rollback", json={"version": version}, headers=HEADERS, timeout=900
        ).raise_for_status()

    async def go():
        async with httpx.AsyncClient(base_url=app.url, timeout=900) as client:
            gate = asyncio.Semaphore(8)

            async def one(item):
                async with gate:
                    r = await client.post("/api/chat", json={"message": item[0]})
                    r.raise_for_status()
                    return r.json()

            return await asyncio.gather(*(one(i) for i in items))

    turns = asyncio.run(go())
    assert {t["model_version"] for t in turns} == {version}, "replies from another version"
    return turns


def _judge(new: list[dict], old: list[dict], items, likes: Taste) -> dict:
    """Every (new reply, old reply) to the same prompt judged by `likes`: win rate, decided."""
    wins = losses = 0
    for (_, topic), n_turn, o_turn in zip(items, new, old, strict=True):
        for n in n_turn["candidates"]:
            for o in o_turn["candidates"]:
                ln, lo = likes(n["text"], topic), likes(o["text"], topic)
                wins += ln and not lo
                losses += lo and not ln
    decided = wins + losses
    return {"win_rate": round(wins / decided, 3) if decided else None, "decided": decided}


def _version_figures(chain, i, replies, items, judges: dict[str, Taste]) -> dict:
    """chain[i]'s held-out figures: degeneration, the share each taste likes, and its win rate
    against its predecessor and against v0 by each taste."""
    version = chain[i]
    texts = [(c["text"], it[1]) for it, t in zip(items, replies[version], strict=True)
             for c in t["candidates"]]  # fmt: skip
    entry = {"version": version, **degeneration(texts)}
    for name, likes in judges.items():
        entry[f"liked[{name}]"] = round(sum(likes(t, topic) for t, topic in texts) / len(texts), 3)
        if i:
            previous = replies[chain[i - 1]]
            entry[f"vs_previous[{name}]"] = _judge(replies[version], previous, items, likes)
            entry[f"vs_v0[{name}]"] = _judge(replies[version], replies["v0000"], items, likes)
    return entry


def _sequence_logp(model, ids, prompt_len: int) -> float:
    """log p(reply | prompt) under `model`, the reply being ids[:, prompt_len:]."""
    import torch

    logits = model(ids).logits[:, prompt_len - 1 : -1]
    reply = ids[:, prompt_len:]
    return torch.log_softmax(logits.float(), -1).gather(-1, reply[..., None]).sum().item()


def kl_to_v0(path: str, v0_path: str, items, max_new_tokens: int, seed: int = 0) -> float:
    """Mean over the prompts of sum_t log p(y_t) - log p_v0(y_t), y sampled from the version at
    temperature 1 (the k1 estimate the gate uses against the serving version)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(v0_path)
    new = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(v0_path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for prompt, _ in items:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )["input_ids"]  # fmt: skip
            out = new.generate(
                ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id,
            )  # fmt: skip
            n = ids.shape[1]
            total += _sequence_logp(new, out, n) - _sequence_logp(ref, out, n)
    return total / len(items)


def run(args: argparse.Namespace, seed: int) -> dict:
    voters = crowd(args.crowd, args.family, args.other, seed)
    rng = random.Random(seed)
    vote_items = prompts(TOPICS[:-HELD_OUT_TOPICS], rng)
    test_items = prompts(TOPICS[-HELD_OUT_TOPICS:], random.Random(0))[: args.held_out]
    flags = ["--model", str(SMOL), "--retrain-every-votes", "0", "--retrain-every-minutes", "0",
             "--reading-words-per-second", "0", "--max-votes-per-minute", "0", "--no-cai",
             "--forwarded-allow-ips", "127.0.0.1",
             *MANY_USERS_ON_ONE_ADDRESS]  # fmt: skip
    if len(voters) > 1:  # a crowd: the product's own cap on one person's share of the votes
        flags += ["--max-vote-source-share", "0.5"]
    if args.max_new_tokens:
        flags += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.canary_share is not None:
        flags += ["--canary-share", str(args.canary_share)]
    if args.retrain_config:
        flags += ["--retrain-config", str(args.retrain_config)]
    flags += shlex.split(args.app_args)
    row: dict = {"crowd": args.crowd, "family": args.family, "other": args.other, "seed": seed,
                 "votes_per_cycle": args.votes, "max_new_tokens": args.max_new_tokens or "default",
                 "app_args": args.app_args}  # fmt: skip
    cycles: list[dict] = []
    chain = ["v0000"]  # the versions that served everybody, in order
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        app = AppProcess(flags, Path(tmp), env={"ASSISTANT_ADMIN_TOKEN": TOKEN}).start(timeout=600)
        try:
            session = Session(app, voters, vote_items)
            carried = 0  # decisive votes cast while a canary ran: the next cycle trains on them
            for n in range(1, args.cycles + 1):
                decisive, chats0 = carried, session.chats
                while decisive < args.votes and session.chats - chats0 < args.max_chats:
                    decisive += session.batch()
                cycle, summary = retrain(app, HEADERS)
                entry = {"cycle": n, "votes": decisive, "chats": session.chats - chats0,
                         **summary, "version": cycle.get("version")}  # fmt: skip
                if args.crowd == "drift" and n == 1:  # the taste changes once the cycle ran
                    for v in voters:
                        v.taste = args.other
                carried = 0
                if cycle["status"] == "challenger":
                    canary_chats = session.chats
                    while session.canary_running():
                        if session.chats - canary_chats >= args.max_canary_chats:
                            # undecided at the cap: retired, as at --canary-max-votes
                            httpx.post(app.url + "/api/canary/retire", headers=HEADERS, timeout=900)
                            entry["canary_retired_by_the_bench"] = True
                            break
                        carried += session.batch()
                    canary = _get(app, "/api/canary")
                    entry["canary"] = {k: canary.get(k) for k in (
                        "decision", "reason", "win_rate", "interval", "votes",
                        "win_rate_style_controlled", "style_note")}  # fmt: skip
                    entry["canary_chats"] = session.chats - canary_chats
                serving = _get(app, "/api/versions")["serving"]
                if serving != chain[-1]:
                    chain.append(serving)
                entry["serving_after"] = serving
                entry["minutes_so_far"] = round((time.perf_counter() - t0) / 60, 1)
                cycles.append(entry)
                print(json.dumps({"progress": entry}, default=str), flush=True)
            versions = {v["version"]: v for v in _get(app, "/api/versions")["versions"]}
            replies = {v: _replies(app, test_items, v) for v in chain}
        finally:
            app.stop()
        judges = {args.family: FAMILIES[args.family]}
        if args.crowd in ("mix", "drift"):
            judges[args.other] = FAMILIES[args.other]
        judged = [
            _version_figures(chain, i, replies, test_items, judges) for i in range(len(chain))
        ]
        for entry in judged[1:]:  # while the versions' folders (in the data directory) exist
            path = versions[entry["version"]]["path"]
            kl_items = test_items[: args.kl_prompts]
            entry["kl_to_v0"] = round(
                kl_to_v0(path, str(SMOL), kl_items, GateConfig().max_new_tokens), 2
            )
    row |= {
        "cycles": cycles,
        "chain": judged,
        "max_kl": GateConfig().max_kl,
        "chats": session.chats,
        "canary_pairs": session.canary_pairs,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="plain")
    parser.add_argument("--other", choices=sorted(FAMILIES), default="opening",
                        help="the second taste (mix, drift)")  # fmt: skip
    parser.add_argument(
        "--crowd", choices=["one", "noise", "mix", "minority", "drift"], default="one"
    )
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--seed", type=int, nargs="+", default=[1])
    parser.add_argument("--votes", type=int, default=40, help="decisive votes before each cycle")
    parser.add_argument("--max-chats", type=int, default=240, help="per vote round")
    parser.add_argument(
        "--max-canary-chats", type=int, default=480,
        help="chats while a canary runs before the bench retires it undecided",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the app's default")
    parser.add_argument("--canary-share", type=float, default=None, help="default: the app's")
    parser.add_argument("--retrain-config", type=Path, default=None)
    parser.add_argument(
        "--app-args", default="", help="more `assistant run` flags, e.g. '--canary-min-votes 20'"
    )
    parser.add_argument("--held-out", type=int, default=32, help="held-out prompts per version")
    parser.add_argument("--kl-prompts", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for seed in args.seed:
        print(json.dumps(run(args, seed), default=str), flush=True)


if __name__ == "__main__":
    main()
