"""The vote journal on a real file: numbering, emptying, compaction, and cut-off lines."""

from __future__ import annotations

from storage import vote_journal
from storage.vote_journal import JournaledVote, VoteJournal


def _vote(n: int) -> JournaledVote:
    return JournaledVote(f"v{n}", f"p{n}", "a", None, "s", None, None, None, None, 1.7e9 + n)


def test_lines_are_numbered_in_order_and_emptied_once_all_are_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(vote_journal, "TRUNCATE_BYTES", 1)  # empty as soon as all are stored
    journal = VoteJournal(tmp_path / "j.jsonl")
    assert [journal.append(_vote(n)) for n in range(3)] == [1, 2, 3]
    assert journal.path.stat().st_mode & 0o777 == 0o600  # it names sessions
    journal.applied_through(2)  # not all stored yet: kept
    assert [v.vote_id for v in journal.read()] == ["v0", "v1", "v2"]
    journal.applied_through(3)
    assert journal.read() == [] and journal.path.stat().st_size == 0
    assert journal.append(_vote(3)) == 4  # numbering goes on
    journal.close()


def test_a_large_journal_keeps_only_the_lines_not_yet_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(vote_journal, "COMPACT_BYTES", 1)
    journal = VoteJournal(tmp_path / "j.jsonl")
    for n in range(5):
        journal.append(_vote(n))
    journal.applied_through(3)
    assert [v.vote_id for v in journal.read()] == ["v3", "v4"]
    assert journal.append(_vote(5)) == 6
    journal.applied_through(4)
    assert [v.vote_id for v in journal.read()] == ["v4", "v5"]
    journal.close()


def test_a_cut_off_line_is_skipped_and_does_not_swallow_the_next(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = VoteJournal(path)
    journal.append(_vote(0))
    with open(path, "ab") as f:
        f.write(b'\n{"vote_id": "v-torn", "pair')  # what a crash mid-write leaves
    journal.append(_vote(1))
    assert [v.vote_id for v in journal.read()] == ["v0", "v1"]
    journal.close()
