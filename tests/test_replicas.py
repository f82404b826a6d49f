"""Several vLLM replicas behind one app: routing, rolling swaps, each reply's true version.

Two real vLLM CPU servers of the tiny model, started here on loopback ports as an operator would
start them, and `assistant run --vllm-url A --vllm-url B` in front of them. Versions whose replies
tell their weights apart: v0001 answers only in the cheerful style ("Sure! ..."), v0002 only in
the plain one (the tiny model taught one style each), v0000 in both (the two-style model the
replicas start on). They are recorded in the app's database before it starts, as earlier cycles
would have left them; every swap below goes through the app's own rollback route, the same
rolling swap a deploy runs (`alignment.serving.serve_version`). The cycle test deploys a version
a real cycle made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.app_process import ADMIN_TOKEN, MANY_USERS_ON_ONE_ADDRESS, AppProcess, chat_turns
from harness.tiny_model import (
    CHEERFUL,
    PLAIN,
    TOPICS,
    TWO_STYLE_RETRAIN_CONFIG,
    build_two_style_checkpoint,
    likes_cheerful,
)

pytestmark = pytest.mark.replicas  # two vLLM servers of its own: make test-fast leaves it out
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STYLE_OF = {"v0001": True, "v0002": False}  # does a reply of this version have "!"?


@pytest.fixture(scope="module")
def style_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("one-style")
    return {
        "cheerful": build_two_style_checkpoint(root / "cheerful", styles=(CHEERFUL,)),
        "plain": build_two_style_checkpoint(root / "plain", styles=(PLAIN,)),
    }


class Replica:
    """A `vllm serve` an operator runs on its own port (the tests' replicas)."""

    def __init__(self, model: Path, log: Path) -> None:
        from assistant.config import EngineConfig
        from engine.vllm_server import EmbeddedVLLMServer

        config = EngineConfig(max_model_len=512, max_num_seqs=32, compile="no")
        self.server = EmbeddedVLLMServer(str(model), config, log)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> Replica:
        self.server.start()
        self.server.wait_ready()
        return self

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # its engine died; its API may be ending
            os.killpg(self.server._proc.pid, signal.SIGKILL)
        self.server._proc.wait(timeout=30)

    def served(self) -> str:
        return httpx.get(self.url + "/weight_info", timeout=10).json()["weight_version"]

    def requests_done(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:request_success_total")
        )

    def reply(self, prompt: str, seed: int, temperature: float = 1.0) -> str:
        body = {
            "model": "policy",
            "messages": [{"role": "user", "content": prompt}],
            "seed": seed,
            "temperature": temperature,
            "max_tokens": 16,
        }
        r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=60)
        return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def replicas(two_style_model, tmp_path_factory) -> Iterator[list[Replica]]:
    logs = tmp_path_factory.mktemp("replica-logs")
    started = [Replica(two_style_model, logs / f"r{i}.log") for i in (1, 2)]
    for r in started:
        r.server.start()
    try:
        for r in started:
            r.server.wait_ready()
        yield started
    finally:
        for r in started:
            r.server.stop()


def _data_dir(tmp_path: Path, base: Path, styles: dict[str, Path]) -> Path:
    """A data directory whose database holds v0001 (cheerful) and v0002 (plain) beside v0000."""
    from storage import Store

    data = tmp_path / "data"
    data.mkdir()
    store = Store(data / "assistant.duckdb")
    store.ensure_base_version("v0000", str(base), {"model": str(base)})
    store.record_model_version("v0001", "v0000", str(styles["cheerful"]), "previous", {})
    store.record_model_version("v0002", "v0000", str(styles["plain"]), "previous", {})
    store.close()
    return data


def _app(replicas: list[Replica], model: Path, data: Path, *extra: str) -> AppProcess:
    urls = [a for r in replicas for a in ("--vllm-url", r.url)]
    return AppProcess(
        [
            *urls,
            "--model",
            str(model),
            "--max-model-len",
            "512",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0.3",  # one-style models: their one style, every time
            "--no-cai",
            "--reading-words-per-second",
            "0",
            "--max-votes-per-minute",
            "0",
            "--retrain-every-votes",
            "0",
            "--retrain-every-minutes",
            "0",
            "--canary-share",
            "0",
            *MANY_USERS_ON_ONE_ADDRESS,
            *extra,
        ],  # fmt: skip
        data,
        env={"ASSISTANT_ADMIN_TOKEN": ADMIN_TOKEN},
    )


def _serve(app: AppProcess, version: str) -> dict:
    r = httpx.post(app.url + "/api/rollback", json={"version": version}, headers=ADMIN, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _health(app: AppProcess) -> dict:
    return httpx.get(app.url + "/api/health", headers=ADMIN, timeout=30).json()


def _stored_replies(db: Path) -> list[tuple[str, str]]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT model_version, text FROM candidates").fetchall()


def _mislabelled(replies: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(v, t) for v, t in replies if v in STYLE_OF and ("!" in t) != STYLE_OF[v]]


def _prompts(n: int, tag: str) -> list[str]:
    return [f"Tell me about {TOPICS[i % len(TOPICS)]} ({tag}-{i})." for i in range(n)]


def test_pairs_spread_over_both_replicas_and_a_swap_reaches_both(
    replicas, two_style_model, style_models, tmp_path
):
    app = _app(replicas, two_style_model, _data_dir(tmp_path, two_style_model, style_models))
    app.start(timeout=300)
    try:
        health = _health(app)
        assert [r["url"] for r in health["replicas"]] == [r.url for r in replicas], health
        assert all(r["in_rotation"] and r["version"] == "v0000" for r in health["replicas"])
        public = httpx.get(app.url + "/api/health").json()["replicas"]
        assert [r["url"] for r in public] == ["replica-1", "replica-2"]  # addresses are private
        before = [r.requests_done() for r in replicas]
        asyncio.run(chat_turns(app, _prompts(16, "spread"), at_once=8))
        served = [r.requests_done() - b for r, b in zip(replicas, before, strict=True)]
        assert all(n >= 2 for n in served), f"requests per replica: {served}"

        for version in ("v0001", "v0002"):
            assert _serve(app, version)["version"] == version
            assert [r.served() for r in replicas] == [version, version]
            assert all(r["version"] == version for r in _health(app)["replicas"])
            turns = asyncio.run(chat_turns(app, _prompts(8, version)))
            assert {t["model_version"] for t in turns} == {version}
            # the same prompt and seed give the same text on both replicas: the same weights;
            # at the app's temperature, the one style of those weights (at 1.0 a tiny one-style
            # model derails now and then: 'W|heese sunlightsks', a tally run's failure)
            texts = [
                [r.reply("Tell me about tea (x).", seed, temperature=0.3) for seed in (1, 2)]
                for r in replicas
            ]
            assert texts[0] == texts[1], texts
            assert all(("!" in t) == STYLE_OF[version] for t in texts[0]), texts
    finally:
        app.stop()
    assert _mislabelled(_stored_replies(app.db)) == []


def test_every_reply_names_the_weights_that_wrote_it_during_rolling_swaps(
    replicas, two_style_model, style_models, tmp_path
):
    """8 users chat without pause while the app swaps v0002 -> v0001 -> v0002 -> v0001 across
    both replicas: no request fails, and every stored reply's label agrees with its style."""
    app = _app(replicas, two_style_model, _data_dir(tmp_path, two_style_model, style_models))
    app.start(timeout=300)
    failures: list[str] = []
    done = threading.Event()
    try:
        _serve(app, "v0002")

        async def user(i: int) -> int:
            turns = 0
            async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:
                while not done.is_set():
                    r = await client.post(
                        "/api/chat", json={"message": f"Tell me about tea ({i})."}
                    )
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    turns += 1
            return turns

        async def crowd() -> list[int]:
            return await asyncio.gather(*(user(i) for i in range(8)))

        counts: list[int] = []
        runner = threading.Thread(target=lambda: counts.extend(asyncio.run(crowd())))
        runner.start()
        try:
            time.sleep(3)
            swaps = [_serve(app, v)["swap_seconds"] for v in ("v0001", "v0002", "v0001")]
            time.sleep(3)
        finally:
            done.set()
            runner.join(timeout=300)
        print("REPLICAS-ROLLING " + json.dumps({"turns": sum(counts), "swap_s": swaps}))
        assert failures == []
        assert sum(counts) >= 16
        assert [r.served() for r in replicas] == ["v0001", "v0001"]
    finally:
        app.stop()
    replies = _stored_replies(app.db)
    by_version = {v: sum(1 for w, _ in replies if w == v) for v in ("v0001", "v0002")}
    assert by_version["v0001"] > 0 and by_version["v0002"] > 0, by_version
    assert _mislabelled(replies) == []


def test_a_replica_down_during_a_swap_rejoins_only_on_the_serving_version(
    replicas, two_style_model, style_models, tmp_path
):
    data = _data_dir(tmp_path, two_style_model, style_models)
    app = _app(replicas, two_style_model, data)
    app.start(timeout=300)
    try:
        _serve(app, "v0002")
        replicas[1].kill()  # SIGKILL, before the app's watch can notice
        assert _serve(app, "v0001")["version"] == "v0001"  # finishes on the one that answers
        health = _health(app)["replicas"]
        assert health[0]["in_rotation"] and health[0]["version"] == "v0001", health
        assert not health[1]["in_rotation"] and not health[1]["healthy"], health
        turns = asyncio.run(chat_turns(app, _prompts(4, "one-down")))
        assert {t["model_version"] for t in turns} == {"v0001"}

        replicas[1].start()  # its supervisor restarts it: on the base weights, unnamed
        deadline = time.monotonic() + 120
        while not _health(app)["replicas"][1]["in_rotation"]:
            assert time.monotonic() < deadline, _health(app)
            time.sleep(0.5)
        assert [r.served() for r in replicas] == ["v0001", "v0001"]
        before = replicas[1].requests_done()
        asyncio.run(chat_turns(app, _prompts(16, "rejoined"), at_once=8))
        assert replicas[1].requests_done() > before  # back in rotation
    finally:
        app.stop()
    log = app.log.read_text()
    assert "stopped answering" in log or "died during the swap" in log
    assert _mislabelled(_stored_replies(app.db)) == []


def test_an_app_restarted_against_replicas_labels_replies_with_what_they_serve(
    replicas, two_style_model, style_models, tmp_path
):
    data = _data_dir(tmp_path, two_style_model, style_models)
    app = _app(replicas, two_style_model, data)
    app.start(timeout=300)
    try:
        _serve(app, "v0001")
    finally:
        app.stop()
    assert [r.served() for r in replicas] == ["v0001", "v0001"]

    # restarted against replicas that serve v0001: replies are labelled v0001
    app.start(timeout=300)
    try:
        assert _health(app)["model_version"] == "v0001"
        turns = asyncio.run(chat_turns(app, _prompts(6, "restart")))
        assert {t["model_version"] for t in turns} == {"v0001"}
    finally:
        app.stop()

    # and with one replica restarted meanwhile on the base weights: swapped before it serves
    replicas[0].kill()
    replicas[0].start()
    assert replicas[0].served() == "default"
    app.start(timeout=300)
    try:
        assert [r["version"] for r in _health(app)["replicas"]] == ["v0001", "v0001"]
        assert replicas[0].served() == "v0001"
        asyncio.run(chat_turns(app, _prompts(8, "restart-base")))
    finally:
        app.stop()
    assert _mislabelled(_stored_replies(app.db)) == []


def test_engines_that_cannot_read_the_versions_folder_refuse_the_start(
    replicas, two_style_model, style_models, tmp_path
):
    data = _data_dir(tmp_path, two_style_model, style_models)
    refused = _app(replicas, two_style_model, data, "--engine-versions-dir", "/nowhere/versions")
    with pytest.raises(RuntimeError, match="app exited"):
        refused.start(timeout=300)
    log = refused.log.read_text()
    assert "cannot read the app's versions folder" in log, log[-2000:]
    assert "--engine-versions-dir" in log

    # the folder "mounted" at another path the engines can read: the start goes on
    mount = tmp_path / "mounted-versions"
    mount.symlink_to(data / "versions")
    app = _app(replicas, two_style_model, data, "--engine-versions-dir", str(mount))
    app.start(timeout=300)
    try:
        assert all(r["in_rotation"] for r in _health(app)["replicas"])
    finally:
        app.stop()


@pytest.mark.cycle
def test_a_cycle_deploys_to_both_replicas(replicas, two_style_model, tmp_path):
    """Votes, a real cycle, a deploy: both replicas then answer a prompt and seed alike, and
    not as v0 did."""
    data = tmp_path / "data"
    retrain = tmp_path / "retrain.json"
    retrain.write_text(json.dumps(TWO_STYLE_RETRAIN_CONFIG))
    app = _app(replicas, two_style_model, data, "--retrain-config", str(retrain))
    app.args[app.args.index("--temperature") + 1] = "1.0"  # the two styles, sampled
    app.start(timeout=300)
    try:
        _serve(app, "v0000")  # the replicas may serve another test's version
        probes = [(f"Tell me about {t} (probe).", seed) for t in TOPICS[:4] for seed in (1, 2)]
        v0 = [replicas[0].reply(p, s) for p, s in probes]
        for attempt in range(3):
            for turn in asyncio.run(chat_turns(app, _prompts(32, f"votes{attempt}"))):
                a, b = (c["text"] for c in turn["candidates"])
                la, lb = likes_cheerful(a), likes_cheerful(b)
                choice = "a" if la and not lb else "b" if lb and not la else "tie"
                r = httpx.post(
                    app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": choice}
                )
                assert r.status_code == 200, r.text
            r = httpx.post(app.url + "/api/retrain?wait=true", headers=ADMIN, timeout=900)
            assert r.status_code == 200, r.text
            cycle = r.json()
            if cycle["status"] == "deployed":
                break
        assert cycle["status"] == "deployed", cycle
        version = cycle["version"]
        assert [r.served() for r in replicas] == [version, version]
        after = [[r.reply(p, s) for p, s in probes] for r in replicas]
        assert after[0] == after[1]
        assert after[0] != v0
    finally:
        app.stop()


def test_weights_that_fail_on_the_first_replica_are_given_to_no_other(
    replicas, two_style_model, style_models, tmp_path
):
    """A deploy whose weights fail to load (a truncated checkpoint) stops at the first replica
    of the rolling swap. vLLM 0.32 breaks the reload's connection ("Error while deserializing
    header") and either lives on with half-loaded weights or dies; the app puts a live one back
    on the old weights, leaves a dead one out until its supervisor restarts it, and never gives
    the second replica those weights."""
    import shutil

    from storage import Store

    data = _data_dir(tmp_path, two_style_model, style_models)
    broken = data / "versions" / "v0003"
    shutil.copytree(style_models["plain"], broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    store = Store(data / "assistant.duckdb")
    store.record_model_version("v0003", "v0000", str(broken), "previous", {})
    store.close()
    app = _app(replicas, two_style_model, data)
    app.start(timeout=300)
    try:
        _serve(app, "v0001")
        refused = httpx.post(
            app.url + "/api/rollback", json={"version": "v0003"}, headers=ADMIN, timeout=300
        )
        assert refused.status_code >= 500, refused.text
        health = _health(app)["replicas"]
        assert health[1]["in_rotation"] and health[1]["version"] == "v0001", health
        assert replicas[1].served() == "v0001"  # never given the broken weights
        versions = httpx.get(app.url + "/api/versions", timeout=30).json()
        assert versions["serving"] == "v0001"
        turns = asyncio.run(chat_turns(app, _prompts(8, "after-a-failed-deploy"), at_once=4))
        assert {t["model_version"] for t in turns} == {"v0001"}

        if not health[0]["healthy"]:  # it died of them: its supervisor restarts it
            replicas[0].kill()
            replicas[0].start()  # on the base weights, unnamed
        deadline = time.monotonic() + 120
        while not _health(app)["replicas"][0]["in_rotation"]:
            assert time.monotonic() < deadline, _health(app)
            time.sleep(0.5)
        assert [r.served() for r in replicas] == ["v0001", "v0001"]
        assert _serve(app, "v0002")["version"] == "v0002"  # the next deploy goes through
    finally:
        app.stop()
    print("first replica:", "died" if not health[0]["healthy"] else "restored", app.log)
    assert _mislabelled(_stored_replies(app.db)) == []
