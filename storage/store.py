"""What the app records: conversations, pairs and votes, Constitutional-AI queues, versions and
runs (canaries in `storage.canaries`), over the connection plumbing of `storage.database`.
Each method is one transaction.

The store speaks in plain dicts and dataclasses; it knows nothing of models, engines or pages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage.acknowledged_votes import AcknowledgedVotes, PairFacts
from storage.cai_records import CAIRecords
from storage.canaries import CanaryRecords
from storage.compaction import compact_if_marked, mark_erasure
from storage.cycle_requests import CycleRequests
from storage.database import Database
from storage.errors import InvalidInputError, NotFoundError, StorageWriteError, StoreError
from storage.importing import ImportedPair, import_rows
from storage.postgres import is_postgres_url
from storage.request_writes import (
    CandidateRecord,
    PairWrite,
    RecordedVote,
    StoreAcknowledgedVote,
    StoredPair,
    VoteWrite,
    check_session,
)
from storage.rules import BOTH_CANDIDATES, check_storable, new_id, session_hash
from storage.set_aside import SetAside, set_aside_path
from storage.shared_records import SharedRecords
from storage.version_records import VersionRecords
from storage.vote_journal import JournaledVote, VoteJournal, journal_path

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 0.5  # before an acknowledged vote whose write failed is tried again


@dataclass(frozen=True)
class OpenedTurn:
    conversation_id: str
    pending_pair: str | None  # a pair of this conversation still waiting for its vote
    history: list[dict[str, str]]  # the transcript the model sees next


class Store(CAIRecords, VersionRecords, CanaryRecords, CycleRequests, SharedRecords, Database):
    """The app's records in one DuckDB file, safe to call from any thread.

    Votes on recent pairs are acknowledged from a journal line (`vote`,
    `storage.vote_journal`) and stored by the writer thread right after; votes a crash left in
    the journal are stored when the file is next opened."""

    def __init__(self, location: Path | str, *, read_only: bool = False) -> None:
        """`location`: a DuckDB file, or a `postgresql://` URL. On Postgres a vote is
        acknowledged once its transaction is committed there, with no local journal: a journal
        line would let another app process on the same database take a second vote on the
        pair, and the commit is what makes it durable for every process."""
        on_postgres = is_postgres_url(location)
        path = None if on_postgres else Path(location)
        if path is not None:
            journal = journal_path(path)
            if read_only and journal.exists() and journal.stat().st_size > 0:
                Store(path).close()  # a crash left acknowledged votes there: store them first
            if not read_only:
                compact_if_marked(path)  # a deletion the last run could not erase (a crash)
        self._acknowledged = AcknowledgedVotes()  # before any read (the migrations') waits on it
        super().__init__(location if on_postgres else path, read_only=read_only)
        self._journal: VoteJournal | None = None
        self._vote_lock = threading.Lock()  # a vote's check and its journal line, as one
        self._closing = False
        self.set_aside = SetAside(set_aside_path(path) if path is not None else None)
        if not read_only and path is not None:
            self._journal = VoteJournal(journal)
            self._store_journaled_votes()

    def close(self) -> None:
        with self._vote_lock:  # no vote is journaled from now on
            self._closing = True
        super().close()  # the writer stores what it holds first
        if self._journal is not None:
            self._journal.applied_through(self._acknowledged.journal_stored_through(), force=True)
            self._journal.close()
        if self.path is not None:
            compact_if_marked(self.path)  # deleted conversations leave the file

    def _store_journaled_votes(self) -> None:
        """Votes a stop left in the journal, stored before anything else. One the database
        refuses is set aside, so that it can never stop the app from starting; a failure of
        the disk itself still does (nothing is dropped: the journal stays as it is)."""
        votes = [_hashed_session(v) for v in self._journal.read()]
        if votes:
            try:
                stored = self._store_acknowledged_now(votes)
            except StoreError:
                raise
            except Exception:  # noqa: BLE001 - one of them is refused: find it, keep the rest
                stored = []
                for vote in votes:
                    try:
                        stored += self._store_acknowledged_now([vote])
                    except StoreError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the database refused this one
                        self.set_aside.add("vote", asdict(vote), _reason(exc))
                        stored.append(False)
            log.info(
                "stored %d acknowledged votes from %s (%d were already stored or their "
                "conversation deleted)", sum(stored), self._journal.path, len(votes) - sum(stored)
            )  # fmt: skip
        self._journal.empty()

    def _store_acknowledged_now(self, votes: list[JournaledVote]) -> list[bool]:
        return self._write(
            lambda con: StoreAcknowledgedVote.run_batch(
                con, [StoreAcknowledgedVote(v) for v in votes]
            )
        )

    def _await_acknowledged_writes(self) -> None:
        self._acknowledged.wait_stored()

    def create_conversation(self, session_id: str | None = None) -> str:
        conversation_id = new_id()
        with self._reads_may_lag(), self._transaction() as con:  # it reads nothing
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
        a vote if any, and the transcript the model sees next.

        It does not wait for the writer to store the vote the user just cast: the votes of
        this conversation that DuckDB may not have yet are taken first, and one that the read
        shows still pending is applied to what was read, as storing it will."""
        if conversation_id is None:
            return OpenedTurn(self.create_conversation(session_id), None, [])
        unstored = self._acknowledged.unstored_in(conversation_id)  # before the read
        with self._reads_may_lag(), self._transaction():  # one snapshot of the three reads
            self.check_owner(conversation_id, session_id)
            pending = self.pending_pair(conversation_id)
            history = self.transcript(conversation_id)
        vote = unstored.get(pending) if pending is not None else None
        if vote is not None:  # pending in DuckDB, voted on the journal
            pending = None
            if vote.continued_with is None:  # both bad: the user turn is asked again
                history = history[:-1]
            else:
                history = [*history, {"role": "assistant", "content": vote.continued_with}]
        return OpenedTurn(conversation_id, pending, history)

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
        votes, AI labels, critiques, the journal's lines). Returns the rows removed per table.
        Their text leaves the database file when it is compacted (`storage.compaction`): when
        the store closes, or opens after a crash."""
        if self.path is not None:  # (Postgres: docs/deployment.md, "Deleting on Postgres")
            mark_erasure(self.path)  # first: a crash after the deletion still erases it
        with self._vote_lock:  # a vote on it now takes the writer's path (checked in DuckDB)
            self._acknowledged.forget_conversation(conversation_id)
        self._acknowledged.wait_stored()  # the ones acknowledged already are stored, to delete
        if self._journal is not None:
            self._journal.applied_through(self._acknowledged.journal_stored_through(), force=True)
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
        if self._acknowledged.retrying_in(conversation_id):
            raise StorageWriteError(
                self.location, "the last vote in this conversation is not stored yet: no space left"
            )  # its reply's place comes first
        write = PairWrite(conversation_id, user_message, prompt, model_version, seed, candidates)
        stored = self._write_grouped(write).result()
        self._acknowledged.remember(
            stored.pair_id,
            PairFacts(
                conversation_id,
                stored.owner,
                {c.slot: c.text for c in candidates},
                {c.slot: c.model_version for c in candidates},
                {c.slot: c.sampling.get("variant") for c in candidates},
            ),
        )
        return stored

    def record_vote(self, pair_id: str, choice: str, **options: Any) -> RecordedVote:
        """`vote` waited for, for callers that have a thread to block (`options`: `VoteWrite`'s)."""
        return self.vote(VoteWrite(pair_id, choice, **options)).result()

    def vote(self, write: VoteWrite) -> Future[RecordedVote]:
        """Store a vote and continue the conversation with the chosen reply (the rules and
        `admit` are `VoteWrite`'s). The future resolves to the vote once it is durable, or to
        its refusal; an async caller awaits it without holding a thread.

        A vote on a pair written since the app started (the last few thousand) is decided here,
        on the caller's thread, from the facts kept when the pair was written, and is durable
        once its journal line is `fsync`ed: the future comes back already resolved, and the
        writer thread stores the vote right after. Any other vote is decided and stored by the
        writer thread, in one transaction with the writes queued beside it.

        Call it on the thread the request arrived on: under load each hand-off to another
        thread waits for a core (bench/RESULTS.md, "Votes acknowledged from a journal")."""
        acknowledged = self._acknowledge(write)
        if acknowledged is not None:
            return acknowledged
        self._acknowledged.forget_pair(write.pair_id)  # later votes on it are checked against this
        return self._write_grouped(write)

    def _acknowledge(self, write: VoteWrite) -> Future[RecordedVote] | None:
        """The vote decided and journaled, when its pair is a recent one; None: it is not (or
        the journal cannot take votes), the writer decides it."""
        answered: Future[RecordedVote] = Future()
        with self._vote_lock:  # the check that the pair has no vote, and the vote, as one
            facts = self._acknowledged.facts(write.pair_id)
            if self._journal is None or self._journal.broken or self._closing or facts is None:
                return None  # (closing: the writer says so, before anything is journaled)
            try:
                recorded = write._vote(facts.as_found())
            except Exception as exc:  # noqa: BLE001 - the vote's own refusal, its answer
                answered.set_exception(exc)
                return answered
            journaled = write.journaled(recorded)

            def queue(line: int) -> None:
                self._acknowledged.acknowledged(line, recorded)
                self._store_acknowledged(line, journaled)

            try:
                self._journal.append(journaled, then=queue)
            except OSError as exc:
                error = StorageWriteError(self._journal.path, str(exc))
                error.__cause__ = exc
                answered.set_exception(error)
                return answered
        answered.set_result(recorded)
        return answered

    def _store_acknowledged(self, line: int, vote: JournaledVote) -> None:
        stored = self._write_grouped(StoreAcknowledgedVote(vote))
        stored.add_done_callback(lambda f: self._acknowledged_vote_done(line, vote, f))

    def _acknowledged_vote_done(self, line: int, vote: JournaledVote, stored: Future) -> None:
        """On the writer thread. A vote it could not store (the disk is full) is tried again
        after a pause, behind what queued meanwhile; it stays in the journal until it is stored
        (on the next open, if the app stops first)."""
        error = stored.exception() if not stored.cancelled() else StoreError("cancelled")
        refused = error is not None and not isinstance(error, StoreError)
        if refused:  # for what it holds: no retry can store it, and retries hold writes back
            self.set_aside.add("vote", asdict(vote), _reason(error))
            self._acknowledged.forget_pair(vote.pair_id)  # may be voted again, via DuckDB
        self._acknowledged.stored(line, vote.pair_id, ok=error is None or refused)
        if error is None or refused:
            self._journal.applied_through(self._acknowledged.journal_stored_through())
            return
        log.error("an acknowledged vote is not stored yet (kept in %s, tried again): %s",
                  self._journal.path, error)  # fmt: skip
        time.sleep(RETRY_PAUSE_S)  # the writer's writes fail alike until the cause is fixed
        with contextlib.suppress(StoreError):  # closing: the next open stores it
            self._store_acknowledged(line, vote)

    def import_preferences(self, pairs: list[ImportedPair], source: str) -> int:
        """Preference pairs from a dataset, each stored as a pair and a decisive vote from
        `import:SOURCE` (`storage.importing`), all in one transaction."""
        check_storable(source, "source")
        if not source or len(source) > 100:
            raise InvalidInputError("the source's name must be 1 to 100 characters")
        return self._write(lambda con: import_rows(con, pairs, source))

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
            "SELECT choice, version_a, version_b FROM ("
            "  SELECT v.choice, json_extract_string(a.sampling, '$.variant') AS version_a, "
            "  json_extract_string(b.sampling, '$.variant') AS version_b "
            f"  FROM votes v JOIN pairs p ON p.id = v.pair_id {BOTH_CANDIDATES} "
            "  WHERE v.flagged IS NULL) AS voted "
            "WHERE version_a IS NOT NULL AND version_b IS NOT NULL AND version_a <> version_b"
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
        """Unflagged voted pairs with their prompt, both candidate texts and where the vote came
        from (session, client tag), oldest first: all of them, or a page of `limit` after the
        row whose (voted_at, vote_id) is `after`."""
        where, params = "v.flagged IS NULL", []
        if after is not None:
            where += " AND (v.created_at, v.id) > (?, ?)"
            params += list(after)
        return self._prompt_rows(
            "SELECT p.id AS pair_id, p.prompt, p.model_version, v.choice, v.source, "
            "a.model_version AS version_a, b.model_version AS version_b, "
            "v.id AS vote_id, v.created_at AS voted_at, v.session_id, v.client, "
            "a.text AS text_a, b.text AS text_b "
            "FROM votes v JOIN pairs p ON p.id = v.pair_id "
            f"{BOTH_CANDIDATES} "
            f"WHERE {where} ORDER BY v.created_at, v.id"
            + (f" LIMIT {int(limit)}" if limit is not None else ""),
            params,
        )


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _hashed_session(vote: JournaledVote) -> JournaledVote:
    """A line journaled before session ids were hashed (migration 10) names the id itself
    (`nonce.tag`; a hash has no dot): stored as its hash, like every other."""
    if vote.session_id is None or "." not in vote.session_id:
        return vote
    return dataclasses.replace(vote, session_id=session_hash(vote.session_id))
