"""What the app records: conversations, pairs and votes, Constitutional-AI queues, versions and
runs (canaries in `storage.canaries`), over the connection plumbing of `storage.database`.
Each method is one transaction.

The store speaks in plain dicts and dataclasses; it knows nothing of models, engines or pages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

import duckdb

from storage.cai_records import CAIRecords
from storage.canaries import CanaryRecords
from storage.database import Database
from storage.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
)
from storage.rules import (
    BOTH_CANDIDATES,
    VOTE_CHOICES,
    continued_slot,
    new_id,
)
from storage.version_records import VersionRecords


def _check_session(owner: str | None, session_id: str | None) -> None:
    if owner is not None and owner != session_id:
        raise ForbiddenError("this conversation belongs to another session")


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
class OpenedTurn:
    conversation_id: str
    pending_pair: str | None  # a pair of this conversation still waiting for its vote
    history: list[dict[str, str]]  # the transcript the model sees next


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


@dataclass(frozen=True)
class StoredPair:
    pair_id: str
    candidate_ids: tuple[str, str]  # (a, b)


class Store(CAIRecords, VersionRecords, CanaryRecords, Database):
    """The app's records in one DuckDB file, safe to call from any thread."""

    def create_conversation(self, session_id: str | None = None) -> str:
        conversation_id = new_id()
        with self._transaction() as con:
            con.execute(
                "INSERT INTO conversations (id, session_id) VALUES (?, ?)",
                [conversation_id, session_id],
            )
        return conversation_id

    def check_owner(self, conversation_id: str, session_id: str | None) -> None:
        """A conversation started in a session belongs to it: others may not continue it or
        vote in it. One started without a session is open to whoever holds its id."""
        rows = self._rows("SELECT session_id FROM conversations WHERE id = ?", [conversation_id])
        if not rows:
            raise NotFoundError(f"unknown conversation_id {conversation_id!r}")
        _check_session(rows[0]["session_id"], session_id)

    def open_turn(self, conversation_id: str | None, session_id: str | None) -> OpenedTurn:
        """Everything a new user turn needs before generation, in one call: the conversation
        (created when None, else checked to belong to the session), the pair still waiting for
        a vote if any, and the transcript the model sees next."""
        if conversation_id is None:
            return OpenedTurn(self.create_conversation(session_id), None, [])
        with self._transaction():  # one snapshot: the three reads agree with each other
            self.check_owner(conversation_id, session_id)
            return OpenedTurn(
                conversation_id,
                self.pending_pair(conversation_id),
                self.transcript(conversation_id),
            )

    # Rows that hang off a conversation, leaves first. DuckDB checks a foreign key against the
    # committed state, so a parent cannot be deleted in the transaction that deletes its
    # children: each level is its own transaction, and a deletion interrupted half-way is
    # finished by running it again (every statement is idempotent).
    _DELETION_LEVELS = (
        (
            "DELETE FROM critiques WHERE candidate_id IN (SELECT c.id FROM candidates c "
            "JOIN pairs p ON p.id = c.pair_id WHERE p.conversation_id = $id)",
            "DELETE FROM ai_labels WHERE pair_id IN "
            "(SELECT id FROM pairs WHERE conversation_id = $id)",
            "DELETE FROM votes WHERE pair_id IN (SELECT id FROM pairs WHERE conversation_id = $id)",
            "DELETE FROM demonstrations WHERE pair_id IN "
            "(SELECT id FROM pairs WHERE conversation_id = $id)",
            "DELETE FROM cai_skips WHERE item_id IN (SELECT id FROM pairs WHERE conversation_id = "
            "$id UNION SELECT c.id FROM candidates c JOIN pairs p ON p.id = c.pair_id "
            "WHERE p.conversation_id = $id)",
        ),
        (
            "DELETE FROM candidates WHERE pair_id IN "
            "(SELECT id FROM pairs WHERE conversation_id = $id)",
            "DELETE FROM messages WHERE conversation_id = $id",
        ),
        ("DELETE FROM pairs WHERE conversation_id = $id",),
        ("DELETE FROM conversations WHERE id = $id",),
    )

    def delete_conversation(self, conversation_id: str) -> dict[str, int]:
        """Delete a conversation and everything recorded from it (messages, pairs, candidates,
        votes, AI labels, critiques). Returns the rows removed per table."""
        removed: dict[str, int] = {}
        for level in self._DELETION_LEVELS:
            with self._transaction() as con:
                for sql in level:
                    table = sql.split()[2]
                    n = con.execute(sql, {"id": conversation_id}).fetchone()[0]
                    removed[table] = removed.get(table, 0) + n
        return removed

    def conversations_older_than(self, days: float) -> list[str]:
        """Conversations started more than `days` ago (the retention rule's candidates)."""
        rows = self._rows(
            "SELECT id FROM conversations WHERE created_at < now() - to_milliseconds(?)",
            [int(days * 86_400_000)],
        )
        return [r["id"] for r in rows]

    def transcript(self, conversation_id: str) -> list[dict[str, str]]:
        """The messages the model sees next: active user turns and chosen replies, in order."""
        rows = self._rows(
            "SELECT role, content FROM messages WHERE conversation_id = ? AND NOT superseded "
            "ORDER BY position",
            [conversation_id],
        )
        return [{"role": r["role"], "content": r["content"]} for r in rows]

    def pending_pair(self, conversation_id: str) -> str | None:
        """The pair of this conversation still waiting for a vote, if any."""
        rows = self._rows(
            "SELECT p.id FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id "
            "WHERE p.conversation_id = ? AND v.id IS NULL ORDER BY p.position DESC LIMIT 1",
            [conversation_id],
        )
        return rows[0]["id"] if rows else None

    # --- pairs and votes ----------------------------------------------------------------

    def record_pair(
        self,
        conversation_id: str,
        user_message: str,
        prompt: list[dict[str, str]],
        model_version: str,
        seed: int,
        candidates: tuple[CandidateRecord, CandidateRecord],
    ) -> StoredPair:
        """Store a user turn with its two candidates atomically: all of it or nothing."""
        pair_id = new_id()
        candidate_ids = (new_id(), new_id())

        def body(con: duckdb.DuckDBPyConnection) -> None:
            position = con.execute(
                "SELECT coalesce(max(position), -1) + 1 FROM messages WHERE conversation_id = ?",
                [conversation_id],
            ).fetchone()[0]
            con.execute(
                "INSERT INTO messages (id, conversation_id, position, role, content, pair_id) "
                "VALUES (?, ?, ?, 'user', ?, ?)",
                [new_id(), conversation_id, position, user_message, pair_id],
            )
            con.execute(
                "INSERT INTO pairs (id, conversation_id, position, prompt, model_version, seed) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [pair_id, conversation_id, position, json.dumps(prompt), model_version, seed],
            )
            for cid, c in zip(candidate_ids, candidates, strict=True):
                con.execute(
                    "INSERT INTO candidates (id, pair_id, slot, text, model_version, sampling, "
                    "prompt_tokens, completion_tokens, finish_reason, latency_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        cid,
                        pair_id,
                        c.slot,
                        c.text,
                        c.model_version,
                        json.dumps(c.sampling),
                        c.prompt_tokens,
                        c.completion_tokens,
                        c.finish_reason,
                        c.latency_ms,
                    ],
                )

        self._write_grouped(body).result()
        return StoredPair(pair_id, candidate_ids)

    def record_vote(self, pair_id: str, choice: str, **options: Any) -> RecordedVote:
        """`submit_vote` (same arguments), waited for: for callers that have a thread to block."""
        return self.submit_vote(pair_id, choice, **options).result()

    def submit_vote(
        self,
        pair_id: str,
        choice: str,
        *,
        voter: str | None = None,
        session_id: str | None = None,
        client: str | None = None,
        admit: Callable[[float, int], str | None] | None = None,
        demonstration: str | None = None,
    ) -> Future[RecordedVote]:
        """Store a vote and continue the conversation with the chosen reply: one call, one
        transaction (under load every extra call queues behind the others; bench/RESULTS.md),
        group-committed with the writes queued beside it. The future resolves to the vote once
        it is durable; an async caller awaits it without holding a thread.

        `admit(age_s, words)` runs inside the transaction once the pair is known to exist, to
        belong to the session and to have no vote yet: it may raise to refuse the vote (nothing
        is stored), and returns the reason to flag it (kept, left out of training) or None.
        `age_s` is the time since both replies were complete and `words` their length.

        a/b: that reply continues; tie: A continues; both_bad: no reply continues and the user
        turn is marked superseded, so the user asks again; both_bad with a `demonstration` (the
        reply the user wrote instead): it is stored, linked to the pair, and continues.
        """
        if demonstration is not None and choice != "both_bad":
            raise ValueError("a demonstration goes with the choice 'both_bad'")
        if choice not in VOTE_CHOICES:
            raise ValueError(f"choice must be one of {', '.join(VOTE_CHOICES)}, got {choice!r}")
        vote_id = new_id()
        admitted: list[str | None] = []  # admit's answer: asked once, however often this reruns

        def body(con: duckdb.DuckDBPyConnection) -> RecordedVote:
            pair = con.execute(
                "SELECT p.conversation_id, p.position, c.session_id, "
                "epoch(now() - p.created_at), EXISTS (SELECT 1 FROM votes WHERE pair_id = p.id) "
                "FROM pairs p JOIN conversations c ON c.id = p.conversation_id WHERE p.id = ?",
                [pair_id],
            ).fetchone()
            if pair is None:
                raise NotFoundError(f"unknown pair_id {pair_id!r}")
            conversation_id, position, owner, age, voted = pair
            _check_session(owner, session_id)
            if voted:
                raise ConflictError(f"pair {pair_id} already has a vote")
            rows = con.execute(
                "SELECT slot, text, model_version, json_extract_string(sampling, '$.variant') "
                "FROM candidates WHERE pair_id = ?",
                [pair_id],
            ).fetchall()
            texts = {slot: text for slot, text, _, _ in rows}
            if not admitted:
                words = sum(len(t.strip().split(" ")) for t in texts.values())
                admitted.append(admit(float(age), words) if admit is not None else None)
            flagged = admitted[0]
            con.execute(
                "INSERT INTO votes (id, pair_id, choice, voter, session_id, client, flagged) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [vote_id, pair_id, choice, voter, session_id, client, flagged],
            )
            slot = continued_slot(choice)
            chosen_text = demonstration if slot is None else texts[slot]
            demonstration_id = None
            if demonstration is not None:
                demonstration_id = new_id()
                con.execute(
                    "INSERT INTO demonstrations (id, pair_id, text) VALUES (?, ?, ?)",
                    [demonstration_id, pair_id, demonstration],
                )
            if chosen_text is None:
                con.execute(
                    "UPDATE messages SET superseded = true WHERE pair_id = ? AND role = 'user'",
                    [pair_id],
                )
            else:
                con.execute(
                    "INSERT INTO messages (id, conversation_id, position, role, content, pair_id) "
                    "VALUES (?, ?, ?, 'assistant', ?, ?)",
                    [new_id(), conversation_id, position + 1, chosen_text, pair_id],
                )
            versions = {slot: version for slot, _, version, _ in rows}
            variants = {slot: variant for slot, _, _, variant in rows}
            if len(set(variants.values())) < 2:
                variants = None  # the same prompting for both: nothing to reveal
            return RecordedVote(
                vote_id,
                pair_id,
                choice,
                conversation_id,
                chosen_text,
                flagged,
                versions,
                demonstration_id,
                variants,
            )

        def guarded(con: duckdb.DuckDBPyConnection) -> RecordedVote:
            try:
                return body(con)
            except duckdb.ConstraintException as exc:  # the pair voted on at the same moment
                if "duplicate key" not in str(exc).lower():
                    raise
                raise ConflictError(f"pair {pair_id} already has a vote") from exc

        return self._write_grouped(guarded)

    def demonstrations(self) -> list[dict[str, Any]]:
        """(prompt, the reply the user wrote) per demonstration whose vote is not flagged,
        oldest first: the SFT stage's human examples and the `sft` export."""
        return self._prompt_rows(
            "SELECT p.prompt, d.text FROM demonstrations d JOIN pairs p ON p.id = d.pair_id "
            "JOIN votes v ON v.pair_id = p.id AND v.flagged IS NULL ORDER BY d.created_at, d.id"
        )

    def variant_votes(self) -> list[dict[str, Any]]:
        """Unflagged votes on pairs whose candidates were prompted with different variants:
        the choice and each slot's variant (named `version_a`/`version_b`, the shape the
        Bradley-Terry ratings read)."""
        return self._rows(
            "SELECT v.choice, json_extract_string(a.sampling, '$.variant') AS version_a, "
            "json_extract_string(b.sampling, '$.variant') AS version_b "
            f"FROM votes v JOIN pairs p ON p.id = v.pair_id {BOTH_CANDIDATES} "
            "WHERE v.flagged IS NULL AND version_a IS NOT NULL AND version_b IS NOT NULL "
            "AND version_a <> version_b"
        )

    def save_prompt_variants(self, body: dict) -> int:
        """Store a prompt-variants file as a new version (history is never overwritten)."""
        return self._append_version("prompt_variant_sets", {"body": json.dumps(body)})

    def latest_prompt_variants(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT body FROM prompt_variant_sets ORDER BY version DESC LIMIT 1")
        return json.loads(rows[0]["body"]) if rows else None

    def count(self, table: str) -> int:
        if table not in {"conversations", "messages", "pairs", "candidates", "votes"}:
            raise ValueError(f"unknown table {table!r}")
        return self._rows(f"SELECT count(*) AS n FROM {table}")[0]["n"]

    def voted_pairs(
        self, after: tuple[Any, str] | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Unflagged voted pairs with their prompt and both candidate texts, oldest first: all
        of them, or a page of `limit` after the row whose (voted_at, vote_id) is `after`."""
        where, params = "v.flagged IS NULL", []
        if after is not None:
            where += " AND (v.created_at, v.id) > (?, ?)"
            params += list(after)
        return self._prompt_rows(
            "SELECT p.id AS pair_id, p.prompt, p.model_version, v.choice, v.source, "
            "v.id AS vote_id, v.created_at AS voted_at, a.text AS text_a, b.text AS text_b "
            "FROM votes v JOIN pairs p ON p.id = v.pair_id "
            f"{BOTH_CANDIDATES} "
            f"WHERE {where} ORDER BY v.created_at, v.id"
            + (f" LIMIT {int(limit)}" if limit is not None else ""),
            params,
        )
