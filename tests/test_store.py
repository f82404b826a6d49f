"""The DuckDB store on a real file: migrations, atomic turns and votes, durability across reopen."""

from __future__ import annotations

import dataclasses
import json

import pytest

from storage import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    Store,
    StoreError,
)
from storage.migrations import MIGRATIONS
from storage.store import CandidateRecord, VoteWrite
from tests import store_reads


def _candidates(text_a="reply A", text_b="reply B"):
    return tuple(
        CandidateRecord(
            slot, text, "v0000", {"temperature": 0.8, "seed": 7 + i}, 12, 5 + i, "stop", 100.0 + i
        )
        for i, (slot, text) in enumerate((("a", text_a), ("b", text_b)))
    )


def _turn(store: Store, conversation_id: str, message: str, **kw):
    prompt = store.transcript(conversation_id) + [{"role": "user", "content": message}]
    return store.record_pair(conversation_id, message, prompt, "v0000", 7, _candidates(**kw))


def _journaled(store: Store, pair_id: str, choice: str, **options):
    """`store.vote`, checked to be answered at once from a new journal line (a recent pair)."""
    lines = len(store._journal.read())
    answered = store.vote(VoteWrite(pair_id, choice, **options))
    assert answered.done() and len(store._journal.read()) == lines + 1
    return answered.result()


def _writer_vote(store: Store, pair_id: str, choice: str, **options):
    """`store.vote` on the writer's path: the store forgets the pair's facts first, as if it
    was written before the store opened, so that DuckDB decides the vote."""
    write = VoteWrite(pair_id, choice, **options)
    store._acknowledged.forget_pair(pair_id)
    return store.vote(write)


# Votes acknowledged from a journal exist on DuckDB only (on Postgres a vote is acknowledged
# after its commit: `storage.store.Store`).
DUCKDB_ONLY = pytest.mark.parametrize("store_location", ["duckdb"], indirect=True)


@pytest.fixture
def store(store_location):
    s = Store(store_location)
    yield s
    s.close()


def test_migrations_apply_once_and_reopen_keeps_data(store_location):
    path = store_location
    s = Store(path)
    assert store_reads.schema_version(s) == MIGRATIONS[-1][0]
    conv = s.create_conversation("sess")
    s.close()
    s = Store(path)  # re-running migrations must be a no-op, not an error
    assert store_reads.schema_version(s) == MIGRATIONS[-1][0]
    assert store_reads.conversation_exists(s, conv)
    assert store_reads.count(s, "conversations") == 1
    s.close()


def test_vote_a_continues_conversation_with_chosen_reply(store):
    conv = store.create_conversation()
    pair = _turn(store, conv, "hello", text_a="first", text_b="second")
    assert store.pending_pair(conv) == pair.pair_id
    result = store.record_vote(pair.pair_id, "b", session_id="s1")
    assert result.continued_with == "second"
    assert store.pending_pair(conv) is None
    assert store.transcript(conv) == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "second"},
    ]
    pair2 = _turn(store, conv, "more")
    stored = store_reads.pair(store, pair2.pair_id)
    # The second turn's prompt carries the chosen reply of the first.
    assert stored["prompt"][1] == {"role": "assistant", "content": "second"}
    assert [c["slot"] for c in stored["candidates"]] == ["a", "b"]
    assert stored["candidates"][1]["completion_tokens"] == 6


def test_tie_continues_with_a_and_both_bad_drops_the_turn(store):
    conv = store.create_conversation()
    store.record_vote(_turn(store, conv, "q1", text_a="A1").pair_id, "tie")
    store.record_vote(_turn(store, conv, "q2").pair_id, "both_bad")
    assert store.transcript(conv) == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "A1"},
    ]
    # The superseded user message is kept for the record, not in the transcript.
    assert store_reads.count(store, "messages") == 3
    assert store_reads.count(store, "votes") == 2


def test_second_vote_unknown_pair_and_bad_choice_change_nothing(store):
    conv = store.create_conversation()
    pair = _turn(store, conv, "hi")
    store.record_vote(pair.pair_id, "a")
    with pytest.raises(ConflictError):
        store.record_vote(pair.pair_id, "b")
    with pytest.raises(NotFoundError):
        store.record_vote("nope", "a")
    with pytest.raises(InvalidInputError, match="must be one of"):
        store.record_vote(pair.pair_id, "c")
    assert store_reads.count(store, "votes") == 1
    assert store_reads.count(store, "messages") == 2  # the failed votes added no assistant message
    assert store_reads.pair(store, pair.pair_id)["vote"]["choice"] == "a"


def test_voted_pairs_joins_prompt_and_both_texts(store):
    conv = store.create_conversation()
    pair = _turn(store, conv, "hi", text_a="x", text_b="y")
    assert store.voted_pairs() == []
    store.record_vote(pair.pair_id, "a")
    (row,) = store.voted_pairs()
    assert (row["choice"], row["text_a"], row["text_b"]) == ("a", "x", "y")
    assert row["prompt"] == [{"role": "user", "content": "hi"}]


def test_voted_pairs_page_by_page_are_all_of_them_in_order(store):
    """Export reads a page at a time; the pages together are exactly the whole."""
    for i in range(7):
        conv = store.create_conversation()
        store.record_vote(_turn(store, conv, f"q{i}").pair_id, "ab"[i % 2])
    whole = store.voted_pairs()
    pages, after = [], None
    while page := store.voted_pairs(after, 3):
        pages.append(page)
        after = (page[-1]["voted_at"], page[-1]["vote_id"])
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [r for p in pages for r in p] == whole and len(whole) == 7


def test_unwritable_location_fails_with_clear_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="--db"):
        Store(blocker / "sub" / "x.duckdb")


def test_second_writer_process_is_refused_with_clear_message(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "locked.duckdb"
    s = Store(path)
    code = (
        "import sys; from storage import Store, StoreError\n"
        f"try:\n    Store({str(path)!r})\nexcept StoreError as e:\n    print(e); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    s.close()
    assert out.returncode == 3, out.stderr
    assert "in use by another process" in out.stdout


def test_flagged_votes_choose_nothing_for_critique_or_sft(store):
    conv = store.create_conversation()
    read = _turn(store, conv, "read", text_a="kept reply")
    store.record_vote(read.pair_id, "a")
    conv2 = store.create_conversation()
    rushed = _turn(store, conv2, "rushed", text_a="rushed reply")
    store.record_vote(
        rushed.pair_id, "a", admit=lambda age, words: "voted 0.2 s after the replies ended"
    )
    todo = store.candidates_to_critique(10)
    assert [t["text"] for t in todo] == ["kept reply"]
    assert store.cai_backlog()["critiques"] == 1
    # a critique recorded for the rushed pick (say, before the rule) still never reaches SFT
    for pair, text in ((read, "kept"), (rushed, "rushed")):
        store.record_critique_round(pair.candidate_ids[0], 1, "p", "c", f"{text} revision", "v0")
    assert [r["revision"] for r in store.revisions()] == ["kept revision"]


def test_deleting_a_conversation_removes_everything_recorded_from_it(store):
    conv, other = store.create_conversation("s"), store.create_conversation("t")
    pair = _turn(store, conv, "forget me")
    keep = _turn(store, other, "keep me")
    store.record_vote(pair.pair_id, "a", session_id="s")
    store.record_vote(keep.pair_id, "b", session_id="t")
    store.record_critique_round(pair.candidate_ids[0], 1, "p", "c", "r", "v0")
    store.record_ai_label(pair.pair_id, "a", "p", 0.9, 0.9, 0.1, "v0")
    removed = store.delete_conversation(conv)
    assert removed == {
        "critiques": 1, "ai_labels": 1, "votes": 1, "demonstrations": 0, "cai_skips": 0,
        "candidates": 2, "messages": 2, "pairs": 1, "conversations": 1,
    }  # fmt: skip
    assert not store_reads.conversation_exists(store, conv) and store_reads.conversation_exists(
        store, other
    )
    assert [r["text_a"] for r in store.voted_pairs()] == ["reply A"]  # only the other one left
    assert store.delete_conversation(conv)["conversations"] == 0  # idempotent


def test_version_names_are_never_reused_and_interrupted_runs_are_failed(store):
    store.ensure_base_version("v0000", "/m", {})
    assert store.next_version() == "v0001"
    store.start_run("cycle", {"version": "v0001", "job": "/jobs/v0001"})  # then the app died
    assert store.next_version() == "v0002"  # the interrupted cycle's name stays taken
    assert store.fail_interrupted_runs() == [{"version": "v0001", "job": "/jobs/v0001"}]
    (run,) = store.training_runs()
    assert run["status"] == "failed" and "interrupted" in run["error"]
    assert store.fail_interrupted_runs() == []


def test_pruning_keeps_serving_previous_and_newest_and_never_the_base(store, tmp_path):
    from alignment.pruning import prune, to_prune

    versions = tmp_path / "versions"
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    store.ensure_base_version("v0000", str(base), {})
    for n in range(1, 6):
        # v0001 lives outside versions/ (a checkpoint someone pointed at): never deleted
        folder = (tmp_path / "elsewhere" if n == 1 else versions) / f"v{n:04d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 2**20)
        (versions / "runs" / f"v{n:04d}").mkdir(parents=True)
        store.record_model_version(f"v{n:04d}", None, str(folder), "candidate", {"gate": {}})
    store.set_serving("v0002", 0.1)
    store.set_serving("v0003", 0.1)  # v0003 serving, v0002 previous
    rows = store.model_versions()
    assert to_prune(rows, keep=1) == (
        ["v0000", "v0002", "v0003", "v0005"], ["v0001", "v0004"]
    )  # fmt: skip
    result = prune(store, versions, keep=1)
    assert result.pruned == ["v0004"] and result.freed_mb == 1.0
    assert "v0001" in result.kept and (tmp_path / "elsewhere" / "v0001").exists()
    assert not (versions / "v0004").exists() and not (versions / "runs" / "v0004").exists()
    assert (versions / "v0005").exists() and base.exists()
    row = store.model_version("v0004")
    assert row["path"] == "" and row["status"] == "candidate"
    assert prune(store, versions, keep=1).pruned == []  # nothing left to prune
    # a pruned version can no longer be rolled back to (the app's and the CLI's rule)
    with pytest.raises(ConflictError, match="no weights to serve"):
        store.servable_path("v0004")
    assert store.servable_path("v0005") == str(versions / "v0005")
    store.record_model_version("v0006", None, str(versions / "v0006"), "rejected", {})
    with pytest.raises(ConflictError, match="no weights to serve"):
        store.servable_path("v0006")


def test_keep_versions_prunes_after_a_deployment_and_keeps_a_challenger(store, tmp_path):
    import asyncio

    from alignment.loop import AlignmentLoop

    versions = tmp_path / "versions"
    store.ensure_base_version("v0000", str(tmp_path / "base"), {})
    for n in range(1, 5):
        (versions / f"v{n:04d}").mkdir(parents=True)
        (versions / f"v{n:04d}.adapter").mkdir()
        store.record_model_version(f"v{n:04d}", None, str(versions / f"v{n:04d}"), "candidate", {})
    store.set_serving("v0002", 0.1)
    store.start_canary("v0005", "v0002", str(versions / "v0005.adapter"), 0.5,
                       {"path": str(versions / "v0005")})  # fmt: skip
    (versions / "v0005").mkdir()
    loop = AlignmentLoop(store, None, tmp_path, keep_versions=1)
    asyncio.run(loop.prune_after_deploy())
    kept = {p.name for p in versions.iterdir()}
    # serving v0002, the challenger v0005 (the newest); v0001, v0003, v0004 and adapters go
    assert kept == {"v0002", "v0002.adapter", "v0005"}, kept
    assert AlignmentLoop(store, None, tmp_path).keep_versions == 5  # the default keeps 5


def test_canary_rows_and_the_votes_that_straddle_two_versions(store):
    from dataclasses import replace

    store.ensure_base_version("v0000", "/base", {})
    store.start_canary("v0001", "v0000", "/adapter", 0.5, {"path": "/v0001", "gate": {}})
    with pytest.raises(ConflictError):  # one challenger at a time
        store.start_canary("v0002", "v0000", "/adapter2", 0.5, {"path": "/v0002"})
    assert store.model_version("v0001")["status"] == "challenger"
    assert store.running_canary()["challenger"] == "v0001"

    def canary_turn(choice: str) -> str:
        cid = store.create_conversation()
        a, b = _candidates()
        pair = store.record_pair(cid, "hi", [], "v0000", 7, (replace(a, model_version="v0001"), b))
        return store.record_vote(pair.pair_id, choice).versions

    assert canary_turn("a") == {"a": "v0001", "b": "v0000"}  # the vote reveals the versions
    same = _turn(store, store.create_conversation(), "same version")
    store.record_vote(same.pair_id, "a")  # not a cross-version pair: not counted
    rows = store.cross_version_votes(("v0001", "v0000"))
    voted_at = rows[0].pop("voted_at")  # when it was cast: a decided canary counts until then
    assert rows == [
        {"choice": "a", "version_a": "v0001", "version_b": "v0000", "session_id": None,
         "client": None, "text_a": "reply A", "text_b": "reply B"}
    ]  # fmt: skip
    assert voted_at.tzinfo is not None
    store.finish_canary(store.running_canary()["id"], "retired", "users said no")
    canary_turn("b")  # cast after the decision
    decided = store.latest_canary()
    assert decided["decision"] == "retired" and store.running_canary() is None
    assert store.model_version("v0001")["status"] == "retired"
    assert len(store.cross_version_votes(("v0001", "v0000"))) == 2
    assert len(store.cross_version_votes(("v0001", "v0000"), decided["decided_at"])) == 1


def test_sft_is_one_setting(tmp_path):
    from alignment.config import cycle_config
    from alignment.loop import AlignmentLoop

    assert AlignmentLoop(
        None, None, tmp_path, cycle_config("default", {"sft": {"enabled": True}})
    ).sft
    assert not AlignmentLoop(
        None, None, tmp_path, cycle_config("default", {"sft": {"epochs": 2}})
    ).sft


def test_threads_write_side_by_side_and_a_pair_takes_one_vote(store):
    """Each thread has its own cursor (no store-wide lock): 8 threads recording turns and votes
    at once lose nothing, and two threads voting on the same pair at the same moment get one
    vote stored and one ConflictError, never two votes or a server error."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def chat_and_vote(i: int) -> str:
        conv = store.create_conversation()
        pair = _turn(store, conv, f"q{i}")
        store.record_vote(pair.pair_id, "ab"[i % 2])
        return pair.pair_id

    with ThreadPoolExecutor(8) as pool:
        voted = list(pool.map(chat_and_vote, range(64)))
    assert store_reads.count(store, "votes") == 64 and store_reads.count(store, "pairs") == 64
    assert {r["pair_id"] for r in store.voted_pairs()} == set(voted)

    for _ in range(5):  # a race, tried a few times
        pair = _turn(store, store.create_conversation(), "contested")
        start = threading.Barrier(2)
        outcomes: list[str] = []

        def vote(choice: str, pair_id=pair.pair_id, barrier=start, outcomes=outcomes) -> None:
            barrier.wait()
            try:
                store.record_vote(pair_id, choice)
                outcomes.append("stored")
            except ConflictError:
                outcomes.append("conflict")

        threads = [threading.Thread(target=vote, args=(c,)) for c in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["conflict", "stored"]
        assert (
            store._rows("SELECT count(*) AS n FROM votes WHERE pair_id = ?", [pair.pair_id])[0]["n"]
            == 1
        )


def _hold_the_writer(store: Store):
    """Occupy the store's writer thread until the returned event is set, so that the writes
    submitted meanwhile queue up and are committed as one batch."""
    import threading

    release, started = threading.Event(), threading.Event()

    def body(con):
        started.set()
        release.wait(10)

    held = store._write_grouped(body)
    assert started.wait(10)
    return release, held


def test_queued_votes_commit_together_and_a_refused_one_takes_none_with_it(store, monkeypatch):
    """Group commit: votes queued while the writer is busy are committed in one transaction; a
    refused one (unknown pair, a second vote on a pair, even within the batch) gets its own
    error and writes nothing, the others are stored. When the batch itself fails (a database
    error), every write runs again alone and still gets its own answer."""
    pairs = [_turn(store, store.create_conversation(), f"q{i}").pair_id for i in range(6)]
    transactions = []
    original = store._write
    monkeypatch.setattr(store, "_write", lambda body: transactions.append(1) or original(body))

    release, held = _hold_the_writer(store)
    together = [_writer_vote(store, p, "a") for p in pairs[:3]]
    release.set()
    assert [f.result(10).pair_id for f in together] == pairs[:3]
    held.result(10)
    assert len(transactions) == 2  # the one that held the writer, then all three at once

    transactions.clear()
    release, held = _hold_the_writer(store)
    mixed = [
        _writer_vote(store, pairs[3], "b"),
        _writer_vote(store, "no-such-pair", "a"),
        _writer_vote(store, pairs[0], "b"),  # already voted above
        _writer_vote(store, pairs[3], "a"),  # the first in this batch took it
        _writer_vote(store, pairs[4], "both_bad", demonstration="my own reply"),
    ]
    release.set()
    assert mixed[0].result(10).continued_with == "reply B"
    with pytest.raises(NotFoundError):
        mixed[1].result(10)
    for second in (mixed[2], mixed[3]):
        with pytest.raises(ConflictError):
            second.result(10)
    assert mixed[4].result(10).continued_with == "my own reply"
    assert len(transactions) == 2  # held, then the whole batch
    assert store_reads.count(store, "votes") == 5
    assert {r["pair_id"]: r["choice"] for r in store.voted_pairs()}[pairs[3]] == "b"

    transactions.clear()
    release, held = _hold_the_writer(store)

    def broken(con):
        con.execute("INSERT INTO no_such_table VALUES (1)")

    failing = store._write_grouped(broken)
    last = _writer_vote(store, pairs[5], "a")
    release.set()
    assert last.result(10).continued_with == "reply A"
    with pytest.raises(Exception, match="no_such_table"):
        failing.result(10)
    assert len(transactions) == 1 + 1 + 2  # held, the failed batch, then each alone
    assert store_reads.count(store, "votes") == 6


def test_closing_the_store_commits_what_is_queued(store_location):
    path = store_location
    store = Store(path)
    pairs = [_turn(store, store.create_conversation(), f"q{i}").pair_id for i in range(3)]
    release, _ = _hold_the_writer(store)
    queued = [_writer_vote(store, p, "a") for p in pairs]
    release.set()
    store.close()
    assert all(f.done() for f in queued)
    with pytest.raises(StoreError):
        store.vote(VoteWrite(pairs[0], "b"))
    reopened = Store(path)
    assert store_reads.count(reopened, "votes") == 3
    reopened.close()


def test_turns_queued_together_keep_their_order_in_a_conversation(store):
    """Two turns of one conversation in one batch take consecutive positions, as they would
    one after the other; a turn of another conversation starts at 0."""
    conv, other = store.create_conversation(), store.create_conversation()
    release, _ = _hold_the_writer(store)
    first = store._write_grouped(_pair_write(conv, "one"))
    second = store._write_grouped(_pair_write(conv, "two"))
    elsewhere = store._write_grouped(_pair_write(other, "three"))
    release.set()
    ids = [f.result(10).pair_id for f in (first, second, elsewhere)]
    positions = {r["id"]: r["position"] for r in store._rows("SELECT id, position FROM pairs", [])}
    assert [positions[i] for i in ids] == [0, 1, 0]
    assert [m["content"] for m in store.transcript(conv)] == ["one", "two"]
    assert len(store_reads.pair(store, ids[1])["candidates"]) == 2


def _pair_write(conversation_id: str, message: str):
    from storage.request_writes import PairWrite

    prompt = [{"role": "user", "content": message}]
    return PairWrite(conversation_id, message, prompt, "v0000", 7, _candidates())


# --- votes acknowledged from the journal ---------------------------------------------------


@DUCKDB_ONLY
def test_a_vote_on_a_recent_pair_is_answered_from_its_journal_line_and_stored_after(store):
    """The writer is held, so the vote cannot be in DuckDB when it is answered: the answer
    comes from the journal. A turn's opening read already sees it; every other read waits
    until the writer has stored it."""
    import threading

    conv = store.create_conversation("s1")
    pair = _turn(store, conv, "hello", text_a="first", text_b="second")
    other = _turn(store, store.create_conversation("s1"), "q").pair_id
    release, held = _hold_the_writer(store)
    try:
        recorded = _journaled(store, pair.pair_id, "b", session_id="s1")
        assert recorded.continued_with == "second"
        assert recorded.versions == {"a": "v0000", "b": "v0000"}
        with pytest.raises(ConflictError):  # the same rules as the writer's path, answered now
            store.vote(VoteWrite(pair.pair_id, "a", session_id="s1")).result(0)
        with pytest.raises(ForbiddenError):
            store.vote(VoteWrite(other, "a", session_id="someone else")).result(0)
        unknown = store.vote(VoteWrite("not-a-recent-pair", "a"))
        assert not unknown.done()  # the writer's path (the writer is held)
        assert store._journal.path.stat().st_size > 0

        opened = store.open_turn(conv, "s1")
        assert not held.done()  # it did not wait for the writer
        assert opened.pending_pair is None
        assert opened.history == [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "second"},
        ]
        seen: list[str | None] = []
        reader = threading.Thread(target=lambda: seen.append(store.pending_pair(conv)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not seen  # waiting for the writer, not reading stale rows
    finally:
        release.set()
    held.result(10)
    with pytest.raises(NotFoundError):
        unknown.result(10)
    reader.join(10)
    assert seen == [None]
    assert store_reads.pair(store, pair.pair_id)["vote"]["choice"] == "b"
    assert store.transcript(conv)[-1] == {"role": "assistant", "content": "second"}
    # the next turn goes after the reply, which was stored first
    assert store_reads.pair(store, _turn(store, conv, "more").pair_id)["position"] == 2


def test_a_vote_takes_the_journal_for_a_recent_pair_and_the_writer_otherwise(tmp_path):
    """One call for every vote: the store answers a vote on a pair it wrote since it opened
    from a new journal line, at once; one on an older pair from DuckDB, on its writer, with no
    line. A refused vote journals nothing on either path."""
    path = tmp_path / "paths.duckdb"
    store = Store(path)
    older = _turn(store, store.create_conversation("s"), "before the restart").pair_id
    store.close()
    store = Store(path)  # it keeps no facts of the pairs written before it opened
    try:
        recent = _turn(store, store.create_conversation("s"), "q").pair_id
        with pytest.raises(InvalidInputError, match="must be one of"):
            store.vote(VoteWrite(recent, "c", session_id="s"))
        with pytest.raises(ForbiddenError):
            store.vote(VoteWrite(recent, "a", session_id="someone else")).result(0)
        assert store._journal.read() == []  # refused: nothing journaled

        answered = store.vote(VoteWrite(recent, "b", session_id="s"))
        assert answered.done()  # resolved on this thread, from its line
        assert answered.result().continued_with == "reply B"
        assert [v.pair_id for v in store._journal.read()] == [recent]

        with pytest.raises(ForbiddenError):
            store.vote(VoteWrite(older, "a", session_id="someone else")).result(10)
        assert store.vote(VoteWrite(older, "a", session_id="s")).result(10).continued_with == (
            "reply A"
        )
        assert [v.pair_id for v in store._journal.read()] == [recent]  # no line for the writer's
        assert {r["pair_id"]: r["choice"] for r in store.voted_pairs()} == {recent: "b", older: "a"}
    finally:
        store.close()


def test_acknowledged_votes_left_in_the_journal_are_stored_on_the_next_open(tmp_path):
    """What a crash between the journal line and DuckDB's commit leaves: the line. The next
    open stores it once (a line already stored, or cut off mid-write, changes nothing)."""
    from storage.vote_journal import JournaledVote, journal_path

    path = tmp_path / "crash.duckdb"
    store = Store(path)
    conv = store.create_conversation("s")
    pending = _turn(store, conv, "q1", text_a="kept")
    done = _turn(store, store.create_conversation("s"), "q2")
    store.record_vote(done.pair_id, "a", session_id="s")
    voted_id = store_reads.pair(store, done.pair_id)["vote"]["id"]
    store.close()

    def line(vote_id, pair_id, choice):
        vote = JournaledVote(vote_id, pair_id, choice, None, "s", None, None, None, None, 1.7e9)
        return json.dumps(dataclasses.asdict(vote)).encode() + b"\n"

    journal_path(path).write_bytes(
        line("v-1", pending.pair_id, "a") + line(voted_id, done.pair_id, "a") + b'{"vote_id": "v-'
    )
    reopened = Store(path, read_only=True)  # an offline reader stores them first, too
    try:
        assert store_reads.pair(reopened, pending.pair_id)["vote"]["id"] == "v-1"
        assert store_reads.count(reopened, "votes") == 2
        assert reopened.transcript(conv)[-1] == {"role": "assistant", "content": "kept"}
    finally:
        reopened.close()
    assert journal_path(path).stat().st_size == 0


@DUCKDB_ONLY
def test_deleting_a_conversation_leaves_nothing_of_it_in_the_journal(store):
    conv = store.create_conversation("s")
    pair = _turn(store, conv, "q")
    _journaled(store, pair.pair_id, "both_bad", session_id="s", demonstration="my secret")
    store.delete_conversation(conv)
    assert b"my secret" not in store._journal.path.read_bytes()
    with pytest.raises(NotFoundError):  # forgotten: the writer's path, which finds no pair
        store.record_vote(pair.pair_id, "a", session_id="s")
    assert store._journal.read() == []


@DUCKDB_ONLY
def test_an_acknowledged_vote_whose_write_fails_is_tried_again_before_its_next_turn(
    store, monkeypatch
):
    """The disk is full when the writer stores a vote that was already answered: the vote is
    kept and tried again; its conversation takes no new turn until then (the turn would take
    the place of the vote's reply), and nothing is lost."""
    import threading

    from storage import StorageWriteError, request_writes
    from storage import store as store_module

    monkeypatch.setattr(store_module, "RETRY_PAUSE_S", 0.05)
    original = request_writes.StoreAcknowledgedVote.run_batch.__func__
    disk_full = threading.Event()
    disk_full.set()

    def failing(cls, con, writes):
        if disk_full.is_set():
            raise StorageWriteError(store.path, "No space left on device")
        return original(cls, con, writes)

    monkeypatch.setattr(request_writes.StoreAcknowledgedVote, "run_batch", classmethod(failing))
    conv = store.create_conversation("s")
    pair = _turn(store, conv, "q", text_a="kept")
    _journaled(store, pair.pair_id, "a", session_id="s")
    store.pending_pair(conv)  # the writer has had it (and failed)
    assert store.open_turn(conv, "s").history[-1] == {"role": "assistant", "content": "kept"}
    with pytest.raises(StorageWriteError):
        _turn(store, conv, "next")
    assert store._journal.read()  # still there for the next open
    disk_full.clear()
    for _ in range(100):
        if store_reads.pair(store, pair.pair_id)["vote"] is not None:
            break
        threading.Event().wait(0.05)
    assert store_reads.pair(store, pair.pair_id)["vote"]["choice"] == "a"
    assert store_reads.pair(store, _turn(store, conv, "next").pair_id)["position"] == 2


# --- what the database cannot hold is never acknowledged, and never blocks -----------------

LONE_SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"voter": LONE_SURROGATE}, "voter"),
        ({"voter": "x" * 201}, "voter"),
        ({"voter": "tab\tin a label"}, "voter"),
        ({"choice": "both_bad", "demonstration": "mine" + LONE_SURROGATE}, "text"),
        ({"session_id": "s" + LONE_SURROGATE}, "session_id"),
        ({"voter": "nul\x00"}, "voter"),
    ],
)
@DUCKDB_ONLY
def test_a_vote_the_database_could_not_store_is_refused_before_its_journal_line(
    store, options, field
):
    pair = _turn(store, store.create_conversation(), "q")
    options = {"choice": "a", **options}
    choice = options.pop("choice")
    with pytest.raises(InvalidInputError, match=f"'{field}'") as refused:
        store.vote(VoteWrite(pair.pair_id, choice, **options))
    assert refused.value.status == 422
    with pytest.raises(InvalidInputError, match=f"'{field}'"):  # the writer's path alike
        _writer_vote(store, pair.pair_id, choice, **options)
    assert store._journal.read() == []  # nothing was acknowledged
    _journaled(store, pair.pair_id, "a", voter="Ünïcode ok \u202e")


def _journal_line(vote_id: str, pair_id: str, voter: str | None) -> bytes:
    from storage.vote_journal import JournaledVote

    vote = JournaledVote(vote_id, pair_id, "a", voter, None, None, None, None, None, 1.7e9)
    return json.dumps(dataclasses.asdict(vote)).encode() + b"\n"  # "\ud800" as its escape


def test_a_journaled_vote_the_database_refuses_is_set_aside_and_the_app_starts(tmp_path):
    """A journal written before the store refused such votes (the reported case: a voter label
    with a lone surrogate, acknowledged, then replayed at every start and failing it)."""
    from storage.vote_journal import journal_path

    path = tmp_path / "db" / "app.duckdb"
    store = Store(path)
    bad = _turn(store, store.create_conversation(), "q1")
    good = _turn(store, store.create_conversation(), "q2", text_a="kept")
    store.close()
    journal_path(path).write_bytes(
        _journal_line("v-bad", bad.pair_id, LONE_SURROGATE)
        + _journal_line("v-ok", good.pair_id, "me")
    )
    reopened = Store(path)  # raised InvalidInputException before the fix
    try:
        assert store_reads.pair(reopened, good.pair_id)["vote"]["id"] == "v-ok"
        assert store_reads.pair(reopened, bad.pair_id)["vote"] is None
        assert reopened.set_aside.count == 1
        aside = reopened.set_aside.path
        assert aside.stat().st_mode & 0o777 == 0o600  # it names sessions, may hold a user's text
        kept = json.loads(aside.read_text().splitlines()[0])
        assert kept["record"]["vote_id"] == "v-bad" and "surrogate" in kept["reason"]
        assert journal_path(path).stat().st_size == 0  # nothing left to replay
    finally:
        reopened.close()
    Store(path).close()  # and the next start is clean too


@DUCKDB_ONLY
def test_an_acknowledged_vote_the_database_refuses_is_set_aside_and_blocks_no_write(
    store, monkeypatch
):
    """Defence in depth: were a check ever missed and such a vote acknowledged, the writer sets
    it aside at once instead of retrying it forever while every other write waits."""
    from storage import request_writes
    from storage import store as store_module

    monkeypatch.setattr(request_writes, "check_storable", lambda text, field: None)
    monkeypatch.setattr(request_writes, "validate_voter", lambda voter: voter)
    monkeypatch.setattr(store_module, "RETRY_PAUSE_S", 60.0)  # a retry would stall the writer
    bad_conv = store.create_conversation("s")
    bad = _turn(store, bad_conv, "q")
    _journaled(store, bad.pair_id, "a", session_id="s", voter=LONE_SURROGATE)
    conv = store.create_conversation("s")
    for n in range(5):  # other users' turns and votes go through the same writer
        pair = _turn(store, conv, f"turn {n}")
        store.record_vote(pair.pair_id, "b", session_id="s")
    assert store.set_aside.count == 1
    assert not store._acknowledged.retrying_in(bad_conv)  # not retried
    assert store_reads.pair(store, bad.pair_id)["vote"] is None
    assert store_reads.count(store, "votes") == 5
    # its conversation is not stuck: the pair can be voted on again (checked against DuckDB)
    lines = len(store._journal.read())
    assert store.record_vote(bad.pair_id, "b", session_id="s").choice == "b"
    assert len(store._journal.read()) == lines  # no line: the writer's path
