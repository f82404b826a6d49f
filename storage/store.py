"""What the app records: conversations, pairs and votes, Constitutional-AI queues, versions and
runs (canaries in `storage.canaries`), over the connection plumbing of `storage.database`.
Each method is one transaction.

The store speaks in plain dicts and dataclasses; it knows nothing of models, engines or pages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from storage.cai_records import CAIRecords
from storage.canaries import CanaryRecords
from storage.database import Database
from storage.errors import NotFoundError
from storage.request_writes import (
    CandidateRecord,
    PairWrite,
    RecordedVote,
    StoredPair,
    VoteWrite,
    check_session,
)
from storage.rules import (
    BOTH_CANDIDATES,
    new_id,
    validate_choice,
)
from storage.version_records import VersionRecords


@dataclass(frozen=True)
class OpenedTurn:
    conversation_id: str
    pending_pair: str | None  # a pair of this conversation still waiting for its vote
    history: list[dict[str, str]]  # the transcript the model sees next


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
        check_session(rows[0]["session_id"], session_id)

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
        """Store a user turn with its two candidates atomically: all of it or nothing (batched
        with the other request writes queued beside it, `storage.request_writes`)."""
        write = PairWrite(conversation_id, user_message, prompt, model_version, seed, candidates)
        return self._write_grouped(write).result()

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
        """Store a vote and continue the conversation with the chosen reply (the rules and
        `admit` are `storage.request_writes.VoteWrite`'s), in one transaction with the writes
        queued beside it. The future resolves to the vote once it is durable, or to its error;
        an async caller awaits it without holding a thread."""
        if demonstration is not None and choice != "both_bad":
            raise ValueError("a demonstration goes with the choice 'both_bad'")
        validate_choice(choice)
        return self._write_grouped(
            VoteWrite(pair_id, choice, voter, session_id, client, admit, demonstration)
        )

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
