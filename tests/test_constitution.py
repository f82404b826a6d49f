"""Constitutional AI: the constitution file, critique-revision chains and AI labels (tiny model)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from alignment.constitution import ConstitutionError, load_constitution, parse_constitution
from alignment.critic import CAIWorker, Critic, label_from_probabilities
from alignment.labels import agreement_rate
from engine.vllm_client import VLLMServerEngine
from storage import Store
from storage.store import CandidateRecord
from tests import store_reads


def test_default_constitution_has_ten_distinct_principles():
    c = load_constitution()
    assert len(c.principles) == 10
    assert len({p.id for p in c.principles}) == 10


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["principles"][2].pop("revision_request"),
            "principle #3 ('honest'): 'revision_request' must be a non-empty string",
        ),
        (lambda d: d["principles"][4].update(id="helpful"), "principle #5 ('helpful'): duplicate"),
        (lambda d: d["principles"][0].update(extra=1), "principle #1 ('helpful'): unknown keys"),
        (lambda d: d.update(principles=[]), "at least one principle"),
        (lambda d: d.pop("principles"), "'principles' list"),
    ],
)
def test_malformed_constitution_is_refused_naming_the_entry(mutate, message):
    data = load_constitution().as_json()
    mutate(data)
    with pytest.raises(ConstitutionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_constitution(data)


def test_constitution_file_errors(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConstitutionError, match="not valid JSON"):
        load_constitution(bad)
    with pytest.raises(ConstitutionError, match="no such file"):
        load_constitution(tmp_path / "missing.json")


def test_label_confidence_comes_from_probabilities():
    label = label_from_probabilities(0.3, 0.1, "honest")
    assert (label.choice, label.confidence) == ("a", pytest.approx(0.75))
    assert label_from_probabilities(0.05, 0.15, "x").choice == "b"
    assert label_from_probabilities(0.0, 0.0, "x").confidence == 0.5


def test_agreement_rate_on_constructed_example():
    rows = [
        {"human": "a", "ai": "a"},
        {"human": "b", "ai": "a"},
        {"human": "b", "ai": "b"},
        {"human": "tie", "ai": "a"},  # not decisive: not compared
        {"human": None, "ai": "b"},  # AI only
        {"human": "a", "ai": None},  # human only
    ]
    assert agreement_rate(rows) == (pytest.approx(2 / 3), 3)
    assert agreement_rate([{"human": "a", "ai": None}]) == (None, 0)


class _Service:
    def __init__(self, generating=0):
        self.generating = generating
        self.model_version = "v0000"


def _store_with_voted_pair(tmp_path) -> tuple[Store, str]:
    store = Store(tmp_path / "cai.duckdb")
    conv = store.create_conversation()
    prompt = [{"role": "user", "content": "Why do things fall down?"}]
    records = tuple(
        CandidateRecord(s, t, "v0000", {}, 5, 5, "stop", 1.0)
        for s, t in (("a", "Earth pulls them."), ("b", "Spacetime bends."))
    )
    pair = store.record_pair(conv, prompt[0]["content"], prompt, "v0000", 1, records)
    store.record_vote(pair.pair_id, "a")
    return store, pair.candidate_ids[0]


def test_worker_stores_chain_round_by_round_then_ai_label(tiny_engine_url, tmp_path):
    store, candidate_id = _store_with_voted_pair(tmp_path)

    async def run():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        critic = Critic(engine, load_constitution(), rounds=2, max_new_tokens=12)
        worker = CAIWorker(critic, store, _Service())
        try:
            backlog = await worker.backlog()
            first = await worker.work_once()  # the critique chain
            second = await worker.work_once()  # the AI label
            third = await worker.work_once()  # nothing left
            return backlog, first, second, third, await worker.backlog()
        finally:
            await engine.aclose()

    before, first, second, third, after = asyncio.run(run())
    assert before == {"critiques": 1, "judgements": 1} and after == {
        "critiques": 0,
        "judgements": 0,
    }
    assert (first, second, third) == (True, True, False)
    chain = store.critique_chain(candidate_id)
    ids = {p.id for p in load_constitution().principles}
    assert [r["round"] for r in chain] == [1, 2]
    assert all(r["principle"] in ids and r["model_version"] == "v0000" for r in chain)
    assert all(isinstance(r["critique"], str) and isinstance(r["revision"], str) for r in chain)
    (label,) = store.label_pairs()
    assert label["human"] == "a" and label["ai"] in ("a", "b")
    assert 0.5 <= label["confidence"] <= 1.0
    store.close()


def test_worker_yields_to_user_traffic_and_works_once_it_ends(tiny_engine_url, tmp_path):
    store, candidate_id = _store_with_voted_pair(tmp_path)
    service = _Service(generating=1)

    async def run():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        worker = CAIWorker(
            Critic(engine, load_constitution(), max_new_tokens=8),
            store,
            service,
            idle_poll_s=0.1,
        )
        task = asyncio.create_task(worker.run_forever())
        try:
            await asyncio.sleep(1.5)
            during = store.critique_chain(candidate_id)
            service.generating = 0  # the user's turn is done: the worker may use the engine
            deadline = asyncio.get_running_loop().time() + 60
            while not store.critique_chain(candidate_id):
                assert asyncio.get_running_loop().time() < deadline, "the worker never worked"
                await asyncio.sleep(0.2)
            return during
        finally:
            task.cancel()
            await engine.aclose()

    assert asyncio.run(run()) == []  # nothing while a user turn was generating
    assert store.critique_chain(candidate_id)  # then it critiqued the reply
    store.close()


def test_app_runs_cai_in_background_and_admin_edits_constitution(tiny_app_factory, monkeypatch):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "cai-token")
    app = tiny_app_factory("--cai-rounds", "2", cai=True)
    turn = httpx.post(app.url + "/api/chat", json={"message": "Hi there"}, timeout=120).json()
    httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": "b"})
    chosen = turn["candidates"][1]["id"]
    deadline, rounds = time.monotonic() + 120, []
    while time.monotonic() < deadline and len(rounds) < 2:
        time.sleep(1)
        rounds = httpx.get(f"{app.url}/api/critiques/{chosen}", headers=app.admin_headers()).json()[
            "rounds"
        ]
    assert [r["round"] for r in rounds] == [1, 2]

    info = httpx.get(app.url + "/api/constitution").json()
    assert len(info["constitution"]["principles"]) == 10
    assert set(info["backlog"]) == {"critiques", "judgements"}

    body = info["constitution"]
    body["principles"] = body["principles"][:3]
    auth = {"Authorization": "Bearer cai-token"}
    assert httpx.put(app.url + "/api/constitution", json=body).status_code == 401
    broken = json.loads(json.dumps(body))
    broken["principles"][1]["critique_request"] = ""
    bad = httpx.put(app.url + "/api/constitution", json=broken, headers=auth)
    assert bad.status_code == 422 and "principle #2 ('harmless')" in bad.json()["error"]
    ok = httpx.put(app.url + "/api/constitution", json=body, headers=auth)
    assert ok.status_code == 200 and ok.json()["version"] == 2
    now = httpx.get(app.url + "/api/constitution").json()["constitution"]
    assert [p["id"] for p in now["principles"]] == ["helpful", "harmless", "honest"]


class _FailingCritic:
    """Every critique raises (as a reply too long for the judge would); judging works."""

    def __init__(self):
        self.calls = 0

    async def critique_chain(self, prompt, text):
        self.calls += 1
        raise RuntimeError("the prompt is longer than the judge's context")

    async def judge(self, prompt, a, b):
        from alignment.critic import AILabel

        return AILabel("a", "p", 0.9, 0.9, 0.1)


def test_an_item_that_keeps_failing_is_skipped_with_its_reason_and_the_queue_moves_on(tmp_path):
    store, candidate_id = _store_with_voted_pair(tmp_path)
    critic = _FailingCritic()
    worker = CAIWorker(critic, store, _Service(), max_attempts=3)

    async def run():
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await worker.work_once()
        assert await worker.work_once()  # third failure: skipped, not raised
        assert await worker.work_once()  # ... so the judgement behind it gets done
        return await worker.backlog()

    assert asyncio.run(run()) == {"critiques": 0, "judgements": 0}
    assert critic.calls == 3
    (skip,) = store_reads.cai_skips(store)
    assert skip["item_id"] == candidate_id and skip["attempts"] == 3
    assert "longer than the judge's context" in skip["reason"]
    store.close()
