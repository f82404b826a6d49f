"""The loop learns: a simulated user with a known preference votes through the HTTP API, one
retrain cycle runs through `POST /api/retrain`, and the deployed version's replies satisfy that
preference measurably more often than v0's, with the KL to the reference under the gate's limit.

The model is the tiny one taught two reply styles half and half (`build_two_style_checkpoint`):
the user likes the cheerful one (it has a "!"). Everything else is the product as a user runs it:
`assistant run` with its own embedded vLLM engine, a real DuckDB file, the worker process, the
hot-swap. v0 is measured after the cycle by rolling back, so its prompts were never trained on.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from alignment.config import GateConfig
from harness.app_process import DEPLOY_AT_THE_GATE, AppProcess, chat_turns, two_style_app_args
from harness.tiny_model import (
    TOPICS,
    TWO_STYLE_RETRAIN_CONFIG,
    likes_cheerful,
)

pytestmark = pytest.mark.cycle  # a whole retrain cycle: make test-fast leaves it out

TOKEN = "learning-token"
RETRAIN_CONFIG = TWO_STYLE_RETRAIN_CONFIG
MAX_KL = GateConfig().max_kl  # the default limit, which the config above keeps
likes = likes_cheerful


def _satisfaction(turns: list[dict]) -> float:
    replies = [c["text"] for t in turns for c in t["candidates"]]
    return sum(map(likes, replies)) / len(replies)


def _admin(app: AppProcess, route: str, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.post(f"{app.url}/api/{route}", json=body or {}, headers=headers, timeout=900)


def test_deployed_version_satisfies_the_users_preference_more_than_v0(
    two_style_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    config_file = tmp_path / "retrain.json"
    config_file.write_text(json.dumps(RETRAIN_CONFIG))
    app = AppProcess(
        [*two_style_app_args(two_style_model, config_file), *DEPLOY_AT_THE_GATE],
        tmp_path / "app",
    ).start(timeout=300)  # fmt: skip
    try:
        # The simulated user: votes for the reply it likes when exactly one has the property,
        # and says "tie" otherwise (a tie refuses no reply: no verdict pairs either).
        voting = [f"Tell me about {t} ({i})." for i in range(4) for t in TOPICS]
        decisive = 0
        for turn in asyncio.run(chat_turns(app, voting)):
            a, b = (likes(c["text"]) for c in turn["candidates"])
            choice = "a" if a and not b else "b" if b and not a else "tie"
            decisive += choice != "tie"
            vote = httpx.post(
                app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": choice}
            )
            assert vote.status_code == 200, vote.text
        assert decisive >= 16, f"only {decisive} decisive votes: v0 should split about half"

        result = _admin(app, "retrain?wait=true")
        assert result.status_code == 200, result.text
        cycle = result.json()
        # one machine-readable line for `python -m bench.learning --repeat N`
        print("LEARNING-CYCLE " + json.dumps({"status": cycle["status"], "gate": cycle["gate"]}))
        assert cycle["status"] == "deployed", cycle
        assert cycle["gate"]["kl"] <= MAX_KL and cycle["gate"]["win_rate"] >= 0.5, cycle["gate"]

        held_out = [f"Tell me about {t} ({i})." for i in (100, 101) for t in TOPICS]
        after = asyncio.run(chat_turns(app, held_out))
        assert {t["model_version"] for t in after} == {cycle["version"]}
        assert _admin(app, "rollback", {"version": "v0000"}).status_code == 200
        before = asyncio.run(chat_turns(app, held_out))
        assert {t["model_version"] for t in before} == {"v0000"}
    finally:
        app.stop()

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
