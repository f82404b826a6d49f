"""The users' votes are the last gate: a version that passed the reward-model gate serves a share
of pairs as the challenger, and the votes on those pairs promote it or retire it.

Through `assistant run` and the HTTP API, on the tiny model taught two reply styles (half and
half): a simulated user likes the cheerful one. A challenger trained on votes for the *other*
style (an adversary's) passes the automatic gate, since its reward model learned the adversary's
taste, and must be retired by the user's votes without ever serving everybody; a challenger
trained on the user's own votes must be promoted. The app, and in the other test the engine, is
killed with SIGKILL halfway through a canary, and the canary resumes with no vote lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from harness.app_process import AppProcess, chat_turns, two_style_app_args
from harness.tiny_model import TOPICS, TWO_STYLE_RETRAIN_CONFIG, likes_cheerful

pytestmark = pytest.mark.cycle  # a whole retrain cycle: make test-fast leaves it out

TOKEN = "canary-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _app(model: Path, data_dir: Path, share: str) -> AppProcess:
    config = data_dir.parent / f"{data_dir.name}-retrain.json"
    config.write_text(json.dumps(TWO_STYLE_RETRAIN_CONFIG))
    return AppProcess(
        [*two_style_app_args(model, config), "--canary-share", share],
        data_dir,
        env={"ASSISTANT_ADMIN_TOKEN": TOKEN},
    )


def _user_choice(a: str, b: str, wants=likes_cheerful) -> str:
    """The reply it likes when exactly one has its style, else a tie."""
    la, lb = wants(a), wants(b)
    return "a" if la and not lb else "b" if lb and not la else "tie"


def _vote(app: AppProcess, turn: dict, choice: str) -> dict:
    r = httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": choice})
    assert r.status_code == 200, r.text
    return r.json()


def _train_challenger(app: AppProcess, wants, attempts: int = 3) -> str:
    """32 chats voted by `wants`, then a cycle by hand, until a version passes the gate and
    starts a canary. (The gate rejects a cycle that did not clearly move the policy; the voter
    then votes on 32 more chats, as a person would. This test is about what the users do with
    a version that got through the gate.)"""
    for attempt in range(attempts):
        prompts = [f"Tell me about {t} ({attempt}-{i})." for i in range(4) for t in TOPICS]
        for turn in asyncio.run(chat_turns(app, prompts)):
            a, b = (c["text"] for c in turn["candidates"])
            _vote(app, turn, _user_choice(a, b, wants))
        r = httpx.post(app.url + "/api/retrain?wait=true", headers=ADMIN, timeout=900)
        assert r.status_code == 200, r.text
        cycle = r.json()
        print("CANARY-CYCLE " + json.dumps({"status": cycle["status"], "gate": cycle["gate"]}))
        if cycle["status"] != "rejected":
            break
    assert cycle["status"] == "challenger", cycle
    versions = httpx.get(app.url + "/api/versions").json()
    status = {v["version"]: v["status"] for v in versions["versions"]}
    assert status[cycle["version"]] == "challenger" and versions["serving"] == "v0000", versions
    canary = httpx.get(app.url + "/api/canary").json()
    assert canary["challenger"] == cycle["version"] and canary["decision"] == "running", canary
    return cycle["version"]


def _judge(app: AppProcess, challenger: str, batches: int, seen: dict) -> dict:
    """The user chats and votes in batches of 16 turns until the canary is decided (or
    `batches` run out); `seen` collects how many pairs were canary pairs and the slots."""
    for n in range(batches):
        prompts = [f"What about {t} ({n}-{i})?" for i in range(2) for t in TOPICS]
        if n == 0 and seen.get("restart"):
            prompts = prompts[:3]  # too few to decide (that takes 4 losses): kill it after
        for turn in asyncio.run(chat_turns(app, prompts)):
            # the chat answer does not say which reply (if any) came from the challenger: it
            # names the challenger only as the version serving everybody, and then the
            # promotion is already recorded (the swap and the verdict are one step; the last
            # vote of a batch can decide, and the swap then runs while the next batch chats)
            if challenger in json.dumps(turn):
                assert turn["model_version"] == challenger, turn
                now = httpx.get(app.url + "/api/canary").json()
                assert now["decision"] == "promoted", (turn, now)
            a, b = (c["text"] for c in turn["candidates"])
            answer = _vote(app, turn, _user_choice(a, b))
            versions = answer["versions"]  # revealed once voted
            seen["turns"] += 1
            if versions["a"] != versions["b"]:
                assert set(versions.values()) == {challenger, "v0000"}, versions
                seen["canary"] += 1
                seen["slots"].add("a" if versions["a"] == challenger else "b")
        canary = httpx.get(app.url + "/api/canary").json()
        if canary["decision"] != "running":
            return canary
        if n == 0 and seen.get("restart"):
            seen["restart"](canary)
    deadline = time.monotonic() + 60  # a decision made by the last vote swaps in the background
    while (canary := httpx.get(app.url + "/api/canary").json())["decision"] == "running":
        assert time.monotonic() < deadline, canary
        time.sleep(1)
    return canary


def test_users_retire_a_worse_challenger_and_the_canary_survives_a_kill(two_style_model, tmp_path):
    app = _app(two_style_model, tmp_path / "app", share="0.5").start(timeout=300)
    try:
        challenger = _train_challenger(app, wants=lambda reply: not likes_cheerful(reply))
        refused = httpx.post(app.url + "/api/retrain", headers=ADMIN, timeout=60)
        assert refused.status_code == 409 and "canary" in refused.json()["error"], refused.text

        def kill_and_restart(before: dict) -> None:
            app.stop(signal.SIGKILL)  # no chance to clean up
            app.start(timeout=300)
            after = httpx.get(app.url + "/api/canary").json()
            assert after["decision"] == "running", after  # resumed, not lost
            assert after["votes"] == before["votes"], (before, after)  # no vote lost

        seen = {"turns": 0, "canary": 0, "slots": set(), "restart": kill_and_restart}
        canary = _judge(app, challenger, batches=13, seen=seen)
        print("CANARY-WORSE " + json.dumps(canary | _tally(seen)))
        assert canary["decision"] == "retired", canary
        assert canary["interval"][1] < 0.5, canary
        assert 0.25 <= seen["canary"] / seen["turns"] <= 0.75, seen  # --canary-share 0.5
        assert seen["slots"] == {"a", "b"}, seen  # the challenger's side is random
        versions = httpx.get(app.url + "/api/versions").json()
        status = {v["version"]: v["status"] for v in versions["versions"]}
        assert versions["serving"] == "v0000" and status[challenger] == "retired", versions
        # the monitors put the reward model's verdict and the users' side by side, and warn
        record = next(v for v in versions["versions"] if v["version"] == challenger)
        assert record["monitors"]["gate_win_rate"] >= 0.5, record
        assert record["monitors"]["human_win_rate"] < 0.5, record
        assert any("users said worse" in w for w in record["warnings"]), record
        # after it: ordinary pairs from the serving version only
        for turn in asyncio.run(chat_turns(app, ["Tell me about tea (after)."] * 4)):
            a, b = (c["text"] for c in turn["candidates"])
            assert set(_vote(app, turn, "tie")["versions"].values()) == {"v0000"}
    finally:
        app.stop()


def test_users_promote_a_better_challenger_and_rate_it_above_v0(two_style_model, tmp_path):
    app = _app(two_style_model, tmp_path / "app", share="1").start(timeout=300)
    try:
        challenger = _train_challenger(app, wants=likes_cheerful)

        def kill_the_engine(before: dict) -> None:
            engines = [
                p
                for p in psutil.Process(app.proc.pid).children(recursive=True)
                if "vllm.entrypoints" in " ".join(p.cmdline())
            ]
            os.killpg(engines[0].pid, signal.SIGKILL)  # the engine and its core die at once
            deadline = time.monotonic() + 300
            time.sleep(3)  # the watcher polls every 2 s
            while httpx.get(app.url + "/api/health", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "the engine did not come back"
                time.sleep(1)
            after = httpx.get(app.url + "/api/canary").json()
            assert after["decision"] == "running" and after["votes"] == before["votes"], after
            # the restarted engine has the challenger's adapter again: canary pairs work
            turn = asyncio.run(chat_turns(app, ["Tell me about tea (restarted)."]))[0]
            versions = _vote(app, turn, "tie")["versions"]
            assert set(versions.values()) == {challenger, "v0000"}, versions

        seen = {"turns": 0, "canary": 0, "slots": set(), "restart": kill_the_engine}
        canary = _judge(app, challenger, batches=16, seen=seen)
        print("CANARY-BETTER " + json.dumps(canary | _tally(seen)))
        assert canary["decision"] == "promoted", canary
        votes = canary["votes"]
        assert votes["challenger"] + votes["serving"] + votes["tie"] >= 30, canary
        assert canary["interval"][0] > 0.5, canary
        versions = httpx.get(app.url + "/api/versions").json()
        assert versions["serving"] == challenger, versions
        rating = {v["version"]: v["rating"] for v in versions["versions"]}
        assert rating[challenger]["score"] > rating["v0000"]["score"], rating
        turn = asyncio.run(chat_turns(app, ["Tell me about tea (after)."]))[0]
        assert turn["model_version"] == challenger
    finally:
        app.stop()


def _tally(seen: dict) -> dict:
    return {"turns": seen["turns"], "canary_pairs": seen["canary"]}
