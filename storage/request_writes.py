"""The two writes of the request path, a turn's pair and a vote, as batches.

The store's writer thread commits whatever has queued up together (`storage.database`); these
writes go one step further and run a whole batch of their kind in a few statements: one read for
all the batch's pairs, one multi-row insert per table. With 32 users on 2 cores that let a
quarter more votes through in the same minute and cut the median vote write by about a quarter
(bench/RESULTS.md); what remains there is the writer thread waiting for a core beside the engine.

A vote that is refused (unknown pair, another session's, already voted, over its limit) gets its
error and writes nothing; the others in the batch are stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import duckdb

from storage.errors import ConflictError, ForbiddenError, NotFoundError
from storage.rules import check_storable, continued_slot, new_id, validate_choice, validate_voter
from storage.vote_journal import JournaledVote


@dataclass(frozen=True)
class CandidateRecord:
    slot: str  # 'a' or 'b'
    text: str
    model_version: str
    sampling: dict
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    latency_ms: float | None


@dataclass(frozen=True)
class StoredPair:
    pair_id: str
    candidate_ids: tuple[str, str]  # (a, b)
    owner: str | None = None  # the session its conversation belongs to (None: open to all)


@dataclass(frozen=True)
class RecordedVote:
    vote_id: str
    pair_id: str
    choice: str
    conversation_id: str
    continued_with: str | None  # the reply that continues the conversation (None: both bad)
    flagged: str | None  # why the vote is kept out of training, if it is
    versions: dict[str, str]  # slot -> the version that wrote that reply
    demonstration_id: str | None = None  # the user's own reply, when they wrote one
    variants: dict[str, str] | None = None  # slot -> prompt variant, when the two differed

    def as_dict(self) -> dict[str, Any]:
        answer = asdict(self)
        for key in ("demonstration_id", "variants"):
            if answer[key] is None:
                del answer[key]  # a plain vote's answer is as it always was
        return answer


def check_session(owner: str | None, session_id: str | None) -> None:
    if owner is not None and owner != session_id:
        raise ForbiddenError("this conversation belongs to another session")


def _marks(values: Sequence[Any]) -> str:
    """`(?, ?, ...)` for an `IN` list of parameters, which DuckDB filters each table by as it
    reads it; a join (or `IN (SELECT unnest(?))`) hashes the whole of every table it touches.
    A vote alone took 18 ms with nothing stored and 57 ms with 50,000 voted turns stored the
    join's way, 11-12 ms at either size this way (`bench.load --write-scaling`)."""
    return "(" + ", ".join("?" * len(values)) + ")"


def _insert(con: duckdb.DuckDBPyConnection, table: str, columns: str, rows: list[list]) -> None:
    """One multi-row INSERT (nothing when there are no rows)."""
    if not rows:
        return
    marks = "(" + ", ".join("?" * len(rows[0])) + ")"
    con.execute(
        f"INSERT INTO {table} ({columns}) VALUES {', '.join([marks] * len(rows))}",
        [value for row in rows for value in row],
    )


@dataclass
class PairWrite:
    """A user turn with its two candidates: all of it or nothing."""

    conversation_id: str
    user_message: str
    prompt: list[dict[str, str]]
    model_version: str
    seed: int
    candidates: tuple[CandidateRecord, CandidateRecord]
    pair_id: str = field(default_factory=new_id)
    candidate_ids: tuple[str, str] = field(default_factory=lambda: (new_id(), new_id()))
    message_id: str = field(default_factory=new_id)

    @classmethod
    def run_batch(cls, con: duckdb.DuckDBPyConnection, writes: Sequence[PairWrite]) -> list:
        conversations = sorted({w.conversation_id for w in writes})
        ids = _marks(conversations)
        rows = con.execute(  # where each turn goes, and who may vote on it (one statement)
            "SELECT 'next', conversation_id, (max(position) + 1)::VARCHAR FROM messages "
            f"WHERE conversation_id IN {ids} GROUP BY conversation_id "
            f"UNION ALL SELECT 'owner', id, session_id FROM conversations WHERE id IN {ids}",
            conversations * 2,
        ).fetchall()
        next_position = {cid: int(value) for kind, cid, value in rows if kind == "next"}
        owners = {cid: value for kind, cid, value in rows if kind == "owner"}
        messages, pairs, candidates = [], [], []
        for w in writes:
            position = next_position.get(w.conversation_id, 0)
            next_position[w.conversation_id] = position + 1
            messages.append(
                [w.message_id, w.conversation_id, position, "user", w.user_message, w.pair_id]
            )
            pairs.append(
                [w.pair_id, w.conversation_id, position, json.dumps(w.prompt), w.model_version,
                 w.seed]
            )  # fmt: skip
            for cid, c in zip(w.candidate_ids, w.candidates, strict=True):
                candidates.append(
                    [cid, w.pair_id, c.slot, c.text, c.model_version, json.dumps(c.sampling),
                     c.prompt_tokens, c.completion_tokens, c.finish_reason, c.latency_ms]
                )  # fmt: skip
        _insert(con, "messages", "id, conversation_id, position, role, content, pair_id", messages)
        _insert(con, "pairs", "id, conversation_id, position, prompt, model_version, seed", pairs)
        _insert(
            con,
            "candidates",
            "id, pair_id, slot, text, model_version, sampling, prompt_tokens, "
            "completion_tokens, finish_reason, latency_ms",
            candidates,
        )
        return [
            StoredPair(w.pair_id, w.candidate_ids, owners.get(w.conversation_id)) for w in writes
        ]


@dataclass
class VoteWrite:
    """A vote and what it continues the conversation with.

    a/b: that reply continues; tie: A continues; both_bad: no reply continues and the user turn
    is marked superseded, so the user asks again; both_bad with a `demonstration` (the reply the
    user wrote instead): it is stored, linked to the pair, and continues.

    `admit(age_s, words)` runs once the pair is known to exist, to belong to the session and to
    have no vote yet: it may raise to refuse the vote (nothing is stored), and returns the
    reason to flag it (kept, left out of training) or None. It is asked once, however often the
    batch runs.

    Made once per vote, where it enters the store, and checked as it is made: nothing the
    database would refuse reaches either path, the journal or the writer (the edge checks the
    same; this is the store's own fence).
    """

    pair_id: str
    choice: str
    voter: str | None = None
    session_id: str | None = None
    client: str | None = None
    admit: Callable[[float, int], str | None] | None = None
    demonstration: str | None = None
    vote_id: str = field(default_factory=new_id)
    _admitted: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.demonstration is not None and self.choice != "both_bad":
            raise ValueError("a demonstration goes with the choice 'both_bad'")
        validate_choice(self.choice)
        validate_voter(self.voter)
        for name, text in (
            ("pair_id", self.pair_id), ("session_id", self.session_id), ("client", self.client),
            ("text", self.demonstration),
        ):  # fmt: skip
            check_storable(text, name)

    def journaled(self, recorded: RecordedVote) -> JournaledVote:
        """This vote's journal line, as it was answered (`recorded`, by `_vote`)."""
        return JournaledVote(
            recorded.vote_id, self.pair_id, self.choice, self.voter, self.session_id, self.client,
            recorded.flagged, recorded.demonstration_id, self.demonstration, time.time(),
        )  # fmt: skip

    def _flag(self, age: float, words: int) -> str | None:
        if not self._admitted:
            self._admitted.append(self.admit(age, words) if self.admit is not None else None)
        return self._admitted[0]

    @classmethod
    def run_batch(cls, con: duckdb.DuckDBPyConnection, writes: Sequence[VoteWrite]) -> list:
        found = cls._pairs(con, sorted({w.pair_id for w in writes}))
        outcomes: list = []
        rows: list[_VoteRow] = []
        now = datetime.now(UTC)
        for w in writes:
            try:
                recorded = w._vote(found.get(w.pair_id))
            except Exception as exc:  # noqa: BLE001 - this vote's own answer; the others go on
                outcomes.append(exc)
                continue
            outcomes.append(recorded)
            pair = found[w.pair_id]
            pair["voted"] = True  # a second vote on it in this batch is refused
            rows.append(
                _VoteRow(recorded, w.voter, w.session_id, w.client, w.demonstration,
                         pair["position"], now)
            )  # fmt: skip
        _store_votes(con, rows)
        return outcomes

    @staticmethod
    def _pairs(con: duckdb.DuckDBPyConnection, pair_ids: list[str]) -> dict[str, dict]:
        """What the votes need of their pairs, in two statements filtered by key: the pair,
        whether it has a vote and its two candidates (rows tagged with the table they come
        from), then the owners of their conversations."""
        ids = _marks(pair_ids)
        rows = con.execute(
            "SELECT 'pair', id, conversation_id, position::VARCHAR, "
            f"epoch(now() - created_at)::VARCHAR FROM pairs WHERE id IN {ids} "
            "UNION ALL SELECT 'voted', pair_id, NULL, NULL, NULL FROM votes "
            f"WHERE pair_id IN {ids} "
            "UNION ALL SELECT slot, pair_id, text, model_version, "
            "json_extract_string(sampling, '$.variant') FROM candidates "
            f"WHERE pair_id IN {ids}",
            pair_ids * 3,
        ).fetchall()
        found: dict[str, dict] = {}
        for kind, pair_id, a, b, c in rows:
            if kind == "pair":
                found[pair_id] = {
                    "conversation": a, "position": int(b), "age": float(c), "voted": False,
                    "texts": {}, "versions": {}, "variants": {},
                }  # fmt: skip
        for kind, pair_id, a, b, c in rows:
            pair = found.get(pair_id)
            if pair is None:
                continue
            if kind == "voted":
                pair["voted"] = True
            elif kind in ("a", "b"):
                pair["texts"][kind], pair["versions"][kind], pair["variants"][kind] = a, b, c
        conversations = sorted({pair["conversation"] for pair in found.values()})
        owners = dict(
            con.execute(
                f"SELECT id, session_id FROM conversations WHERE id IN {_marks(conversations)}",
                conversations,
            ).fetchall()
            if conversations
            else []
        )
        for pair in found.values():
            pair["owner"] = owners.get(pair["conversation"])
        return found

    def _vote(self, pair: dict | None) -> RecordedVote:
        """This vote's checks and answer, before anything of it is written."""
        if pair is None:
            raise NotFoundError(f"unknown pair_id {self.pair_id!r}")
        check_session(pair["owner"], self.session_id)
        if pair["voted"]:
            raise ConflictError(f"pair {self.pair_id} already has a vote")
        words = sum(len(t.strip().split(" ")) for t in pair["texts"].values())
        flagged = self._flag(float(pair["age"]), words)
        demonstration_id = new_id() if self.demonstration is not None else None
        return answer(
            self.vote_id, self.pair_id, self.choice, pair, flagged, self.demonstration,
            demonstration_id,
        )  # fmt: skip


def answer(
    vote_id: str,
    pair_id: str,
    choice: str,
    pair: dict,
    flagged: str | None,
    demonstration: str | None,
    demonstration_id: str | None,
) -> RecordedVote:
    """A vote's answer from its pair's facts (`VoteWrite._pairs`' shape): the reply that
    continues the conversation, each slot's version, and the variants when the two differed."""
    slot = continued_slot(choice)
    variants = pair["variants"]
    return RecordedVote(
        vote_id,
        pair_id,
        choice,
        pair["conversation"],
        demonstration if slot is None else pair["texts"][slot],
        flagged,
        dict(pair["versions"]),
        demonstration_id,
        # the same prompting for both: nothing to reveal
        dict(variants) if len(set(variants.values())) >= 2 else None,
    )


@dataclass(frozen=True)
class _VoteRow:
    """An accepted vote with what its rows need besides its answer."""

    recorded: RecordedVote
    voter: str | None
    session_id: str | None
    client: str | None
    demonstration: str | None
    position: int  # the pair's, in its conversation
    voted_at: datetime


def _store_votes(con: duckdb.DuckDBPyConnection, rows: Sequence[_VoteRow]) -> None:
    """The votes' rows: the vote, the demonstration if any, and the reply that continues the
    conversation (or, for both bad, the user turn marked superseded)."""
    votes, demonstrations, replies, superseded = [], [], [], []
    for row in rows:
        v = row.recorded
        votes.append(
            [v.vote_id, v.pair_id, v.choice, row.voter, row.session_id, row.client, v.flagged,
             row.voted_at]
        )  # fmt: skip
        if v.demonstration_id is not None:
            demonstrations.append([v.demonstration_id, v.pair_id, row.demonstration])
        if v.continued_with is None:
            superseded.append(v.pair_id)
        else:
            replies.append(
                [new_id(), v.conversation_id, row.position + 1, "assistant", v.continued_with,
                 v.pair_id]
            )  # fmt: skip
    _insert(
        con, "votes", "id, pair_id, choice, voter, session_id, client, flagged, created_at", votes
    )
    _insert(con, "demonstrations", "id, pair_id, text", demonstrations)
    _insert(con, "messages", "id, conversation_id, position, role, content, pair_id", replies)
    if superseded:
        con.execute(
            "UPDATE messages SET superseded = true WHERE role = 'user' "
            f"AND pair_id IN {_marks(superseded)}",
            superseded,
        )


@dataclass
class StoreAcknowledgedVote:
    """A vote already acknowledged from its journal line (`storage.vote_journal`): stored as it
    was answered, with no check left that could refuse it. Skipped when its pair is gone (the
    conversation was deleted) or already has it (a replay of a line stored before a crash).
    Runs before the other writes of its batch: a turn queued after it continues from its reply."""

    vote: JournaledVote
    runs_first: ClassVar[bool] = True

    @classmethod
    def run_batch(
        cls, con: duckdb.DuckDBPyConnection, writes: Sequence[StoreAcknowledgedVote]
    ) -> list[bool]:
        found = VoteWrite._pairs(con, sorted({w.vote.pair_id for w in writes}))
        outcomes, rows = [], []
        for w in writes:
            v, pair = w.vote, found.get(w.vote.pair_id)
            if pair is None or pair["voted"]:
                outcomes.append(False)
                continue
            pair["voted"] = True
            recorded = answer(
                v.vote_id, v.pair_id, v.choice, pair, v.flagged, v.demonstration,
                v.demonstration_id,
            )  # fmt: skip
            rows.append(
                _VoteRow(recorded, v.voter, v.session_id, v.client, v.demonstration,
                         pair["position"], datetime.fromtimestamp(v.voted_at, UTC))
            )  # fmt: skip
            outcomes.append(True)
        _store_votes(con, rows)
        return outcomes
