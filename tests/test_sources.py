"""No one session or address decides alone: one source's share of the decisive votes, capped
the same way for the canary's verdict and for reward-model training (`alignment.sources`).

The rule by hand on plain rows, then through a real DuckDB store to the canary's count and to
the preferences a cycle hands its worker.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from alignment.canary import CanaryVotes, count_canary_votes, decide
from alignment.config import CanaryConfig
from alignment.loop import AlignmentLoop
from alignment.sources import cap_source_share
from assistant.canary_service import CanaryService
from storage import ConflictError, Store
from storage.store import CandidateRecord


def _votes(*sources: str) -> list[dict]:
    """One vote per 'session@address' (either part may be empty: none), oldest first."""
    rows = []
    for i, source in enumerate(sources):
        session, _, client = source.partition("@")
        rows.append({"n": i, "session_id": session or None, "client": client or None})
    return rows


def _kept(rows: list[dict], share: float) -> list[int]:
    return [r["n"] for r in cap_source_share(rows, share)]


def test_one_source_counts_at_most_its_share_of_the_counted_votes():
    # s1 casts 6 of 9; s2 2, s3 1. Cap 3: 3 + 2 + 1 = 6 counted, s1 holds 3 = half. Cap 4 would
    # count 7 with s1 holding 4 > 3.5. So s1's first three (votes 0, 1, 3) count, 5, 7, 8 not.
    rows = _votes("s1@x", "s1@x", "s2@y", "s1@x", "s3@z", "s1@x", "s2@y", "s1@x", "s1@x")
    assert _kept(rows, 0.5) == [0, 1, 2, 3, 4, 6]
    assert _kept(rows, 1.0) == list(range(9))  # --single-user: every vote counts
    # at 0.25 even cap 1 fails (one each: 3 counted, 1 > 0.75): nothing counts
    assert _kept(rows, 0.25) == []


def test_many_sessions_from_one_address_are_one_source():
    # six sessions at address x, then two votes of one session at y. Cap 2: x's first two and
    # y's two, 4 counted, x holds 2 = half; cap 3 would count 5 with x holding 3 > 2.5.
    rows = _votes("a@x", "b@x", "c@x", "d@x", "e@x", "f@x", "t@y", "t@y")
    assert _kept(rows, 0.5) == [0, 1, 6, 7]


def test_alone_a_source_counts_nothing_unless_single_user_and_sourceless_votes_count():
    assert _kept(_votes("s@x", "s@x", "s@x"), 0.5) == []
    assert _kept(_votes("s@x", "s@x", "s@x"), 1.0) == [0, 1, 2]
    assert _kept(_votes("s@x", "t@y", "s@x", "t@y"), 0.5) == [0, 1, 2, 3]  # even: all count
    # a vote with neither session nor address is nobody's: it is never capped
    assert _kept(_votes("@", "@", "s@x"), 0.5) == [0, 1, 2]
    assert _kept(_votes("@x", "@x", "@y"), 0.5) == [0, 2]  # no session: counted by address


def test_four_straight_losses_from_one_voter_retire_no_challenger():
    loss = {"choice": "b", "version_a": "v1", "version_b": "v0"}  # v0 serves, v1 challenges
    one_voter = [{**loss, "session_id": "s", "client": "x"}] * 4
    assert decide(count_canary_votes(one_voter, "v1", "v0"), 30, 200).decision == "retired"
    capped = count_canary_votes(one_voter, "v1", "v0", max_share=0.5)
    assert capped == CanaryVotes(over_share=4)
    assert decide(capped, 30, 200).decision is None
    # a second voter's win: cap 1, one loss and one win count, three losses do not
    win = {"choice": "a", "version_a": "v1", "version_b": "v0", "session_id": "t", "client": "y"}
    both_bad = {**win, "choice": "both_bad"}  # compares nothing: counted apart, never capped
    votes = count_canary_votes([*one_voter, win, both_bad], "v1", "v0", max_share=0.5)
    assert votes == CanaryVotes(challenger=1, serving=1, both_bad=1, over_share=3)
    assert "3 more not counted: over one voter's share" in decide(votes, 30, 200).reason


def _pair(store: Store, versions: tuple[str, str] = ("v0000", "v0000")) -> str:
    candidates = tuple(
        CandidateRecord(slot, f"reply {slot}", version, {"seed": 7}, 12, 5, "stop", 100.0)
        for slot, version in zip("ab", versions, strict=True)
    )
    cid = store.create_conversation()
    return store.record_pair(cid, "hi", [], "v0000", 7, candidates).pair_id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db" / "test.duckdb")
    s.ensure_base_version("v0000", str(tmp_path), {})
    yield s
    s.close()


def test_the_canary_counts_the_stores_votes_with_the_cap(store):
    store.start_canary("v0001", "v0000", "/adapter", 0.5, {"path": "/v0001"})
    for _ in range(4):  # one session at one address prefers the serving version, four times
        pair = _pair(store, ("v0001", "v0000"))
        store.record_vote(pair, "b", session_id="s1", client="c-x")
    canary = CanaryService(store, None, CanaryConfig(), asyncio.Lock(), max_source_share=0.5)
    row = store.running_canary()
    assert asyncio.run(canary.votes(row)) == CanaryVotes(over_share=4)
    alone = CanaryService(store, None, CanaryConfig(), asyncio.Lock())  # --single-user
    assert asyncio.run(alone.votes(row)) == CanaryVotes(serving=4)


def test_reward_model_training_takes_no_more_of_one_sources_votes(store, tmp_path):
    votes = [("s1", "c-x")] * 4 + [("s2", "c-y"), ("s3", "c-z")]  # s1 cast 4 of 6
    for session, client in votes:
        store.record_vote(_pair(store), "a", session_id=session, client=client)
    engine = SimpleNamespace(base_url="http://127.0.0.1:9")

    class NoWorker:  # reads what the worker would train on, and stops there
        async def launch(self, job, environment, wait_s):
            self.preferences = (job / "preferences.jsonl").read_text().splitlines()
            raise RuntimeError("no worker in this test")

    def preferences(share: float, data_dir: str) -> list[dict]:
        launcher = NoWorker()
        loop = AlignmentLoop(
            store, engine, tmp_path / data_dir, max_source_share=share, launcher=launcher
        )
        with pytest.raises(RuntimeError, match="no worker"):
            asyncio.run(loop.retrain())
        (job,) = (tmp_path / data_dir / "jobs").iterdir()
        assert not (job / "preferences.jsonl").exists()  # the copies go when the cycle ends
        return [json.loads(line) for line in launcher.preferences]

    # cap 2: s1's first two, s2's and s3's: s1 holds 2 of 4, half
    assert len(preferences(0.5, "shared")) == 4
    assert len(preferences(1.0, "single-user")) == 6


def test_a_cycle_on_one_sources_votes_alone_says_why(store, tmp_path):
    for _ in range(3):
        store.record_vote(_pair(store), "a", session_id="s1", client="c-x")
    loop = AlignmentLoop(store, None, tmp_path / "data", max_source_share=0.5)
    with pytest.raises(ConflictError, match="all 3 decisive votes came from one session"):
        asyncio.run(loop.retrain())
