"""The background scheduler: the trigger rule, and a cycle it starts by itself in a running app."""

from __future__ import annotations

import asyncio
import time

import httpx

from alignment.config import LoopConfig
from alignment.scheduler import cycle_due


def test_cycle_due_rule():
    config = LoopConfig(every_votes=50, every_minutes=60)
    assert not cycle_due(0, 999, config)  # nothing new to learn from
    assert cycle_due(50, 1, config)
    assert not cycle_due(49, 59, config)
    assert cycle_due(1, 60, config)
    assert not cycle_due(10, None, LoopConfig(every_votes=0, every_minutes=60))
    assert not cycle_due(500, 500, LoopConfig(every_votes=0, every_minutes=0))


def test_app_retrains_by_itself_after_n_votes(tiny_app_factory, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "t")
    app = tiny_app_factory(
        "--model",
        str(tiny_model_dir),
        "--retrain-preset",
        "fast",
        "--retrain-every-votes",
        "3",
        "--retrain-poll-seconds",
        "1",
    )
    for i in range(3):
        turn = httpx.post(app.url + "/api/chat", json={"message": f"hello {i}"}, timeout=120).json()
        httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": "a"})
    deadline = time.monotonic() + 300
    serving = "v0000"
    while time.monotonic() < deadline and serving == "v0000":
        time.sleep(2)
        serving = httpx.get(app.url + "/api/versions").json()["serving"]
    assert serving == "v0001"
    httpx.post(
        app.url + "/api/rollback",
        json={"version": "v0000"},
        headers={"Authorization": "Bearer t"},
        timeout=120,
    )


def test_page_says_how_far_the_next_retrain_is_and_how_the_last_one_ended(tmp_path):
    """The chat page's loop line, from the scheduler's vote count (a real DuckDB file)."""
    from types import SimpleNamespace

    from alignment.scheduler import RetrainScheduler
    from storage import Store
    from storage.store import CandidateRecord
    from ui.page import loop_line

    store = Store(tmp_path / "db.duckdb")
    conversation = store.create_conversation()
    records = tuple(
        CandidateRecord(slot, "reply", "v0000", {}, 1, 1, "stop", 1.0) for slot in ("a", "b")
    )
    pair = store.record_pair(
        conversation, "hi", [{"role": "user", "content": "hi"}], "v0000", 1, records
    )
    store.record_vote(pair.pair_id, "a")
    loop = SimpleNamespace(running=False, stage="idle", last=None)
    scheduler = RetrainScheduler(loop, store, LoopConfig(every_votes=3))

    def line():
        return asyncio.run(loop_line(loop, scheduler))

    assert line() == "Next retrain after 2 more votes for A or B."
    loop.last = {"status": "deployed", "version": "v0001"}
    assert line().startswith("New version **v0001** learned from your votes")
    loop.running, loop.stage = True, "ppo"
    assert line() == "Retraining on your votes now (ppo); this version answers meanwhile."
    store.close()


def test_the_page_shows_a_failed_cycles_public_text_not_its_error(tmp_path):
    """Every visitor reads the loop line: a cycle that failed on an error naming the engine's
    URL or a server path says neither (the log and the run's record have them)."""
    from pathlib import Path
    from types import SimpleNamespace

    import pytest

    from alignment.loop import AlignmentLoop
    from storage import StorageWriteError
    from ui.page import loop_line

    url = "http://10.9.8.7:8000"
    failure: Exception = RuntimeError(f"engine at {url} refused /srv/assistant/versions/v0001")

    def voted_pairs():
        raise failure

    loop = AlignmentLoop(SimpleNamespace(voted_pairs=voted_pairs), SimpleNamespace(), tmp_path)
    with pytest.raises(RuntimeError):
        asyncio.run(loop.retrain())
    assert url in loop.last["error"]  # kept for whoever may read it
    line = asyncio.run(loop_line(loop, None))
    assert "(failed: the cycle failed; the server log says why)" in line
    assert url not in line and "/srv" not in line
    # an error meant for callers says what it says to them
    failure = StorageWriteError(Path("/srv/assistant/db.duckdb"), "No space left on device")
    with pytest.raises(StorageWriteError):
        asyncio.run(loop.retrain())
    line = asyncio.run(loop_line(loop, None))
    assert "the disk is full" in line and "/srv" not in line


def test_the_page_says_a_new_version_is_being_tried_and_how_many_votes_decide_it(tmp_path):
    """A running canary on the chat page's loop line (a real store, the real canary service
    around a fake engine): the challenger's name and the votes still needed."""
    import asyncio
    from types import SimpleNamespace

    from alignment.config import CanaryConfig
    from assistant.canary_service import CanaryService
    from harness.fake_engine import FakeEngine
    from storage import Store
    from ui.page import loop_line

    store = Store(tmp_path / "db.duckdb")
    store.ensure_base_version("v0000", str(tmp_path / "base"), {})
    for name in ("v0001", "adapter"):
        (tmp_path / name).mkdir()
    store.start_canary("v0001", "v0000", str(tmp_path / "adapter"), 0.5, {"path": str(tmp_path)})
    loop = SimpleNamespace(running=False, stage="idle", last=None)

    async def line() -> str:
        canary = CanaryService(store, FakeEngine(), CanaryConfig(min_votes=30), asyncio.Lock())
        await canary.resume()
        return await loop_line(loop, None, canary)

    text = asyncio.run(line())
    assert text.startswith("A new version is being tried on some replies"), text
    assert "v0001" not in text  # which version is revealed only after a vote on its pair
    assert "at least 30 more votes to go" in text, text
    store.close()


def test_a_vote_too_fast_to_have_read_says_it_does_not_count():
    from storage.request_writes import RecordedVote
    from ui.page import vote_note

    def answer(flagged):
        return RecordedVote("v", "p", "a", "c", "reply", flagged, {"a": "v0", "b": "v0"})

    assert vote_note("a", answer(None)) == "Vote saved: A is better."
    note = vote_note("a", answer("voted 0.4 s after the replies; reading 60 words needs 12 s"))
    assert note.startswith("Vote saved: A is better. It was kept, but it does not count")
    assert "reading 60 words needs 12 s" in note
