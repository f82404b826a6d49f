"""The loop learns, and keeps learning: a simulated user with a known preference votes through
the HTTP API, a retrain cycle runs through `POST /api/retrain`, and the deployed version's replies
satisfy that preference measurably more often than v0's, with the KL to the reference under the
gate's limit. Then the user votes on what that version serves and a second cycle runs from it:
what it makes is deployed only if the user finds it no worse, else the first cycle's version
keeps serving.

The model is the tiny one taught two reply styles half and half (`build_two_style_checkpoint`):
the user likes the cheerful one (it has a "!"). Everything else is the product as a user runs it:
`assistant run` with its own embedded vLLM engine, a real DuckDB file, the worker process, the
hot-swap. v0 is measured after the cycle by rolling back, so its prompts were never trained on.
The two tests share one app and its first cycle (a module fixture): the second test is the loop's
next turn, not a fresh start.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from alignment.config import GateConfig
from harness.app_process import DEPLOY_AT_THE_GATE, AppProcess, chat_turns, two_style_app_args
from harness.tiny_model import (
    TOPICS,
    TWO_STYLE_RETRAIN_CONFIG,
    likes_cheerful,
)

pytestmark = pytest.mark.cycle  # whole retrain cycles: make test-fast leaves it out

TOKEN = "learning-token"
RETRAIN_CONFIG = TWO_STYLE_RETRAIN_CONFIG
MAX_KL = GateConfig().max_kl  # the default limit, which the config above keeps
likes = likes_cheerful
HELD_OUT = [f"Tell me about {t} ({i})." for i in (100, 101) for t in TOPICS]  # never voted on


def _satisfaction(turns: list[dict]) -> float:
    replies = [c["text"] for t in turns for c in t["candidates"]]
    return sum(map(likes, replies)) / len(replies)


def _admin(app: AppProcess, route: str, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.post(f"{app.url}/api/{route}", json=body or {}, headers=headers, timeout=900)


def _vote(app: AppProcess, rounds: range) -> tuple[int, set[str]]:
    """The simulated user chats on `rounds` x TOPICS and votes for the reply it likes when
    exactly one has the property, "tie" otherwise (a tie refuses no reply: no verdict pairs
    either). Returns its decisive votes and the versions it voted on."""
    voting = [f"Tell me about {t} ({i})." for i in rounds for t in TOPICS]
    turns = asyncio.run(chat_turns(app, voting))
    decisive = 0
    for turn in turns:
        a, b = (likes(c["text"]) for c in turn["candidates"])
        choice = "a" if a and not b else "b" if b and not a else "tie"
        decisive += choice != "tie"
        vote = httpx.post(
            app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": choice}
        )
        assert vote.status_code == 200, vote.text
    return decisive, {t["model_version"] for t in turns}


def _held_out(app: AppProcess, version: str) -> list[dict]:
    """`version`'s replies to the held-out prompts, after a rollback to it if another serves."""
    if httpx.get(app.url + "/api/versions", timeout=30).json()["serving"] != version:
        assert _admin(app, "rollback", {"version": version}).status_code == 200
    turns = asyncio.run(chat_turns(app, HELD_OUT))
    assert {t["model_version"] for t in turns} == {version}
    return turns


@dataclass
class FirstCycle:
    app: AppProcess
    votes: int
    cycle: dict
    before: list[dict] | None = None  # v0's held-out replies
    after: list[dict] | None = None  # the deployed version's


@pytest.fixture(scope="module")
def first_cycle(two_style_model, tmp_path_factory) -> Iterator[FirstCycle]:
    """One app, the user's votes on v0's pairs, one cycle; if it deployed, its held-out replies
    and then v0's (after a rollback): the learning test's material, and the second cycle's start."""
    root = tmp_path_factory.mktemp("learning")
    config_file = root / "retrain.json"
    config_file.write_text(json.dumps(RETRAIN_CONFIG))
    app = AppProcess(
        [*two_style_app_args(two_style_model, config_file), *DEPLOY_AT_THE_GATE],
        root / "app",
        env={"ASSISTANT_ADMIN_TOKEN": TOKEN},
    ).start(timeout=300)
    try:
        decisive, voted_on = _vote(app, range(4))
        assert voted_on == {"v0000"}
        result = _admin(app, "retrain?wait=true")
        assert result.status_code == 200, result.text
        first = FirstCycle(app, decisive, result.json())
        # one machine-readable line for `python -m bench.learning --repeat N`
        print(
            "LEARNING-CYCLE "
            + json.dumps({"status": first.cycle["status"], "gate": first.cycle["gate"]})
        )
        if first.cycle["status"] == "deployed":
            first.after = _held_out(app, first.cycle["version"])
            first.before = _held_out(app, "v0000")
        yield first
    finally:
        app.stop()


def test_deployed_version_satisfies_the_users_preference_more_than_v0(first_cycle):
    cycle, decisive = first_cycle.cycle, first_cycle.votes
    assert decisive >= 16, f"only {decisive} decisive votes: v0 should split about half"
    assert cycle["status"] == "deployed", cycle
    assert cycle["gate"]["kl"] <= MAX_KL and cycle["gate"]["win_rate"] >= 0.5, cycle["gate"]
    before, after = first_cycle.before, first_cycle.after
    v0, v1 = _satisfaction(before), _satisfaction(after)
    # The user's verdict between v0's and the new version's reply to the same prompt.
    wins = losses = 0
    for old, new in zip(before, after, strict=True):
        for o, n in zip(old["candidates"], new["candidates"], strict=True):
            wins += likes(n["text"]) and not likes(o["text"])
            losses += likes(o["text"]) and not likes(n["text"])
    print(
        "LEARNING-RESULT "
        + json.dumps({"votes": decisive, "v0": v0, "new": v1, "wins": wins, "losses": losses})
    )
    print(
        f"decisive votes {decisive}; liked replies v0 {v0:.2f} -> {cycle['version']} {v1:.2f}; "
        f"new version wins {wins} of {wins + losses} decisive comparisons; "
        f"KL {cycle['gate']['kl']:.2f}"
    )
    # 64 replies each: a 0.15 rise is over 2.5 standard errors of the difference at p = 0.5.
    # (How many votes it takes to win 70% of comparisons is bench/learning.py's question.)
    assert v1 - v0 >= 0.15, (v0, v1)
    assert wins > losses, (wins, losses)


def test_a_second_cycle_deploys_a_version_no_worse_than_the_first_or_refuses(first_cycle):
    """The loop's next turn: the user votes on v1's pairs (mostly cheerful already, so far fewer
    decisive votes), and a cycle trains from v1 (its KL reference) on every vote so far."""
    app, first = first_cycle.app, first_cycle.cycle
    assert first["status"] == "deployed", first  # the first cycle is the learning test's
    v1 = first["version"]
    assert (
        _admin(app, "rollback", {"version": v1}).status_code == 200
    )  # the learning test ended on v0
    votes, voted_on = _vote(app, range(10, 16))
    assert voted_on == {v1}  # the users vote on what the first cycle made
    answer = _admin(app, "retrain?wait=true")
    # no decisive vote on v1's pairs is a refusal too (409: nothing to train on)
    assert answer.status_code in (200, 409), answer.text
    second = answer.json() if answer.status_code == 200 else {"status": "no new votes"}
    serving = httpx.get(app.url + "/api/versions", timeout=30).json()["serving"]
    v2_turns = _held_out(app, second["version"]) if second["status"] == "deployed" else None
    liked = {
        "v0": _satisfaction(first_cycle.before),
        "v1": _satisfaction(first_cycle.after),
        "v2": _satisfaction(v2_turns) if v2_turns else None,
    }
    line = {"votes": votes, "status": second["status"], "gate": second.get("gate"), "liked": liked}
    print("SECOND-CYCLE " + json.dumps(line, default=str))  # for `bench.learning --repeat N`
    if second["status"] != "deployed":
        assert serving == v1, serving  # refused: the first cycle's version still serves
        return
    assert serving == second["version"]
    assert second["gate"]["win_rate"] >= 0.5, second["gate"]
    # 64 replies each: a drop of 0.1 is about two standard errors where v1 is liked 0.8-0.95
    assert liked["v2"] >= liked["v1"] - 0.1, line
    assert liked["v2"] - liked["v0"] >= 0.15, line  # and the gain over v0 is kept
