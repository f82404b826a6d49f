"""The one writer of the DuckDB file.

DuckDB allows a single read-write process per file, so the app process owns one connection and
serialises every statement through a lock: concurrent requests never interleave half-transactions.
Each write is one transaction; once `commit` returns, DuckDB has written and synced its WAL, so an
acknowledged vote survives `kill -9` of the app.

The store speaks in plain dicts and dataclasses; it knows nothing of models, engines or pages.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb

from storage.canaries import CanaryRecords
from storage.errors import (
    ConflictError,
    DatabaseInUseError,
    ForbiddenError,
    NotFoundError,
    StorageWriteError,
    StoreError,
)
from storage.migrations import MIGRATIONS
from storage.rules import (
    AWAITING_CRITIQUE,
    BOTH_CANDIDATES,
    VOTE_CHOICES,
    continued_slot,
    new_id,
    version_name,
)

# DuckDB reports a failed write as an IOException, or at commit as a TransactionException
# wrapping "Could not write file ..."; the latter also covers logic errors, hence the wording test.
_IO_WORDS = ("could not write", "no space left", "read-only file system", "input/output error")


def _is_io_failure(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.IOException) or any(w in str(exc).lower() for w in _IO_WORDS)


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StoredPair:
    pair_id: str
    candidate_ids: tuple[str, str]  # (a, b)


class Store(CanaryRecords):
    """Thread-safe access to one DuckDB file, schema migrated on open."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the database folder {self.path.parent}: {exc.strerror}. "
                    "Pass --db with a writable path."
                ) from exc
        elif not self.path.exists():
            raise StoreError(f"no database at {self.path}; start the app once or pass --db")
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "lock" in msg.lower():
                raise DatabaseInUseError(
                    f"the database {self.path} is in use by another process (only one process "
                    f"may write it): {msg.splitlines()[0]}"
                ) from exc
            raise StoreError(
                f"cannot open the database {self.path}: {msg.splitlines()[0]}. "
                "Pass --db with a writable path."
            ) from exc
        if not read_only:
            self._migrate()

    # --- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._con.close()

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            self._con.begin()
            try:
                yield self._con
            except BaseException as exc:
                self._con.rollback()
                if isinstance(exc, duckdb.Error) and _is_io_failure(exc):
                    raise StorageWriteError(self.path, str(exc)) from exc
                raise
            try:
                self._con.commit()  # a failed commit leaves no transaction open
            except duckdb.Error as exc:
                if _is_io_failure(exc):
                    raise StorageWriteError(self.path, str(exc)) from exc
                raise

    def _rows(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._con.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _prompt_rows(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        """Rows whose `prompt` column holds the JSON message list sent to the engine."""
        rows = self._rows(sql, params)
        for r in rows:
            r["prompt"] = json.loads(r["prompt"])
        return rows

    def _migrate(self) -> None:
        with self._lock:
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "description VARCHAR, applied_at TIMESTAMPTZ DEFAULT now())"
            )
            done = {
                r[0] for r in self._con.execute("SELECT version FROM schema_migrations").fetchall()
            }
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            with self._transaction() as con:
                con.execute(sql)
                con.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                    [version, description],
                )

    # --- conversations ------------------------------------------------------------------

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
        with self._lock:
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
        with self._transaction() as con:
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
        return StoredPair(pair_id, candidate_ids)

    def record_vote(
        self,
        pair_id: str,
        choice: str,
        *,
        voter: str | None = None,
        session_id: str | None = None,
        client: str | None = None,
        admit: Callable[[float, int], str | None] | None = None,
    ) -> RecordedVote:
        """Store a vote and continue the conversation with the chosen reply: one call, one
        transaction (under load every extra call queues behind the others; bench/RESULTS.md).

        `admit(age_s, words)` runs inside the transaction once the pair is known to exist, to
        belong to the session and to have no vote yet: it may raise to refuse the vote (nothing
        is stored), and returns the reason to flag it (kept, left out of training) or None.
        `age_s` is the time since both replies were complete and `words` their length.

        a/b: that reply continues; tie: A continues; both_bad: no reply continues and the user
        turn is marked superseded, so the user asks again.
        """
        if choice not in VOTE_CHOICES:
            raise ValueError(f"choice must be one of {', '.join(VOTE_CHOICES)}, got {choice!r}")
        vote_id = new_id()
        with self._transaction() as con:
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
                "SELECT slot, text, model_version FROM candidates WHERE pair_id = ?", [pair_id]
            ).fetchall()
            texts = {slot: text for slot, text, _ in rows}
            versions = {slot: version for slot, _, version in rows}
            words = sum(len(t.strip().split(" ")) for t in texts.values())
            flagged = admit(float(age), words) if admit is not None else None
            con.execute(
                "INSERT INTO votes (id, pair_id, choice, voter, session_id, client, flagged) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [vote_id, pair_id, choice, voter, session_id, client, flagged],
            )
            slot = continued_slot(choice)
            chosen_text = None if slot is None else texts[slot]
            if slot is None:
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
        return RecordedVote(
            vote_id, pair_id, choice, conversation_id, chosen_text, flagged, versions
        )

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

    # --- constitutional AI ----------------------------------------------------------------

    def save_constitution(self, name: str, body: dict) -> int:
        """Store a constitution as a new version (history is never overwritten)."""
        with self._transaction() as con:
            version = con.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM constitutions"
            ).fetchone()[0]
            con.execute(
                "INSERT INTO constitutions (version, name, body) VALUES (?, ?, ?)",
                [version, name, json.dumps(body)],
            )
        return version

    def latest_constitution(self) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT version, name, body FROM constitutions ORDER BY version DESC LIMIT 1"
        )
        if not rows:
            return None
        rows[0]["body"] = json.loads(rows[0]["body"])
        return rows[0]

    def candidates_to_critique(self, limit: int) -> list[dict[str, Any]]:
        """Chosen replies (the continued one of a/b/tie votes) with no critique round yet.
        Flagged votes (too fast to have read the replies) choose nothing: their revisions would
        reach SFT by the back door that reward-model training closed to them."""
        return self._prompt_rows(
            f"SELECT c.id AS candidate_id, c.text, p.prompt {AWAITING_CRITIQUE} "
            "ORDER BY v.created_at LIMIT ?",
            [limit],
        )

    def cai_backlog(self) -> dict[str, int]:
        """How many chosen replies await a critique and pairs await an AI judgement."""
        row = self._rows(
            f"SELECT (SELECT count(*) {AWAITING_CRITIQUE}) AS critiques, "
            "       (SELECT count(*) FROM pairs p WHERE NOT EXISTS "
            "        (SELECT 1 FROM ai_labels l WHERE l.pair_id = p.id) AND NOT EXISTS "
            "        (SELECT 1 FROM cai_skips s WHERE s.item_id = p.id)) AS judgements"
        )[0]
        return {"critiques": int(row["critiques"]), "judgements": int(row["judgements"])}

    def record_cai_skip(self, item_id: str, kind: str, reason: str, attempts: int) -> None:
        """Give up on a critique or judgement that keeps failing (too long for the judge, say),
        so it stops blocking the queue behind it; the reason stays for the operator."""
        with self._transaction() as con:
            con.execute(
                "INSERT INTO cai_skips (item_id, kind, reason, attempts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [item_id, kind, reason[:500], attempts],
            )

    def record_critique_round(
        self,
        candidate_id: str,
        round_: int,
        principle: str,
        critique: str,
        revision: str,
        model_version: str,
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "INSERT INTO critiques (id, candidate_id, round, principle, critique, revision, "
                "model_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [new_id(), candidate_id, round_, principle, critique, revision, model_version],
            )

    def critique_chain(self, candidate_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT round, principle, critique, revision, model_version, created_at "
            "FROM critiques WHERE candidate_id = ? ORDER BY round",
            [candidate_id],
        )

    def critiqued_candidates(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently critiqued replies: candidate id, the user's question, the reply."""
        return self._prompt_rows(
            "SELECT c.id AS candidate_id, c.text, p.prompt, max(k.created_at) AS last "
            "FROM critiques k JOIN candidates c ON c.id = k.candidate_id "
            "JOIN pairs p ON p.id = c.pair_id GROUP BY c.id, c.text, p.prompt "
            "ORDER BY last DESC LIMIT ?",
            [limit],
        )

    def revisions(self) -> list[dict[str, Any]]:
        """(prompt, final revision) per critiqued reply, for the SFT stage; none from a reply
        that a flagged vote chose (critiqued before the flag rule, say)."""
        return self._prompt_rows(
            "SELECT p.prompt, k.revision FROM critiques k "
            "JOIN candidates c ON c.id = k.candidate_id JOIN pairs p ON p.id = c.pair_id "
            "JOIN votes v ON v.pair_id = p.id AND v.flagged IS NULL "
            "WHERE k.round = (SELECT max(round) FROM critiques k2 "
            "                 WHERE k2.candidate_id = k.candidate_id)"
        )

    def pairs_to_judge(self, limit: int) -> list[dict[str, Any]]:
        return self._prompt_rows(
            "SELECT p.id AS pair_id, p.prompt, a.text AS text_a, b.text AS text_b FROM pairs p "
            f"{BOTH_CANDIDATES} "
            "WHERE NOT EXISTS (SELECT 1 FROM ai_labels l WHERE l.pair_id = p.id) "
            "AND NOT EXISTS (SELECT 1 FROM cai_skips s WHERE s.item_id = p.id) "
            "ORDER BY p.created_at LIMIT ?",
            [limit],
        )

    def record_ai_label(
        self,
        pair_id: str,
        choice: str,
        principle: str,
        confidence: float,
        p_a: float,
        p_b: float,
        model_version: str,
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "INSERT INTO ai_labels (id, pair_id, choice, principle, confidence, p_a, p_b, "
                "model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [new_id(), pair_id, choice, principle, confidence, p_a, p_b, model_version],
            )

    def ai_labeled_pairs(self) -> list[dict[str, Any]]:
        """AI-labeled pairs that have no decisive human vote, shaped like `voted_pairs` rows."""
        return self._prompt_rows(
            "SELECT p.id AS pair_id, p.prompt, l.choice, 'ai' AS source, l.confidence, "
            "a.text AS text_a, b.text AS text_b FROM ai_labels l JOIN pairs p ON p.id = l.pair_id "
            f"{BOTH_CANDIDATES} "
            "LEFT JOIN votes v ON v.pair_id = p.id "
            "WHERE v.id IS NULL OR v.choice NOT IN ('a', 'b') ORDER BY l.created_at"
        )

    def label_pairs(self) -> list[dict[str, Any]]:
        """Pairs with a human vote and/or an AI label: (pair_id, human choice, AI choice)."""
        return self._rows(
            "SELECT p.id AS pair_id, v.choice AS human, l.choice AS ai, l.confidence "
            "FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id "
            "LEFT JOIN ai_labels l ON l.pair_id = p.id "
            "WHERE v.id IS NOT NULL OR l.id IS NOT NULL ORDER BY p.created_at"
        )

    # --- model versions -----------------------------------------------------------------

    def ensure_base_version(self, version: str, path: str, manifest: dict) -> None:
        """Record the base checkpoint as a model version (idempotent)."""
        with self._transaction() as con:
            exists = con.execute(
                "SELECT 1 FROM model_versions WHERE version = ?", [version]
            ).fetchone()
            if not exists:
                con.execute(
                    "INSERT INTO model_versions (version, parent, path, status, manifest) "
                    "VALUES (?, NULL, ?, 'serving', ?)",
                    [version, path, json.dumps(manifest)],
                )

    def record_model_version(
        self, version: str, parent: str | None, path: str, status: str, manifest: dict
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "INSERT INTO model_versions (version, parent, path, status, manifest) "
                "VALUES (?, ?, ?, ?, ?)",
                [version, parent, path, status, json.dumps(manifest, default=str)],
            )

    def serving_version(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT version, path FROM model_versions WHERE status = 'serving'")
        return rows[0] if rows else None

    def model_version(self, version: str) -> dict[str, Any]:
        rows = self._rows(
            "SELECT version, path, status FROM model_versions WHERE version = ?", [version]
        )
        if not rows:
            raise NotFoundError(f"unknown version {version!r}")
        return rows[0]

    def next_version(self) -> str:
        """The next version name, never one a recorded version or any cycle (failed or
        interrupted ones too) already took, so no two cycles write the same folder."""
        n = self._rows(
            "SELECT max(n) AS n FROM ("
            "  SELECT TRY_CAST(substr(version, 2) AS INTEGER) AS n FROM model_versions"
            "  UNION ALL SELECT TRY_CAST(substr(json_extract_string(config, '$.version'), 2) "
            "  AS INTEGER) FROM training_runs)"
        )[0]["n"]
        return version_name((-1 if n is None else n) + 1)

    def fail_interrupted_runs(self) -> list[dict[str, Any]]:
        """Cycles still 'running' when the app starts were cut off by a stop or crash: mark
        them failed (nothing of them was served) and return their configs for cleanup."""
        with self._transaction() as con:
            rows = con.execute(
                "UPDATE training_runs SET status = 'failed', finished_at = now(), "
                "error = 'interrupted: the app stopped during the cycle' "
                "WHERE status = 'running' RETURNING config"
            ).fetchall()
        return [json.loads(r[0]) if r[0] else {} for r in rows]

    def mark_pruned(self, version: str) -> None:
        """Its weights were deleted: keep the row and metrics, forget the path."""
        with self._transaction() as con:
            con.execute(
                "UPDATE model_versions SET path = '', "
                "manifest = json_merge_patch(manifest, '{\"pruned\": true}') WHERE version = ?",
                [version],
            )

    def set_serving(self, version: str, swap_seconds: float) -> None:
        """The swapped-in version becomes 'serving', the one it replaced 'previous'."""
        with self._transaction() as con:
            previous = con.execute(
                "SELECT version FROM model_versions WHERE status = 'serving'"
            ).fetchone()
            con.execute("UPDATE model_versions SET status = 'previous' WHERE status = 'serving'")
            con.execute("UPDATE model_versions SET status = 'serving' WHERE version = ?", [version])
            con.execute(
                "INSERT INTO deployments (id, version, previous, swap_seconds) VALUES (?, ?, ?, ?)",
                [new_id(), version, previous[0] if previous else None, swap_seconds],
            )

    def start_run(self, kind: str, config: dict) -> str:
        run_id = new_id()
        with self._transaction() as con:
            con.execute(
                "INSERT INTO training_runs (id, kind, status, config) VALUES (?, ?, ?, ?)",
                [run_id, kind, "running", json.dumps(config, default=str)],
            )
        return run_id

    def finish_run(
        self, run_id: str, status: str, metrics: dict | None = None, error: str | None = None
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "UPDATE training_runs SET status = ?, finished_at = now(), metrics = ?, error = ? "
                "WHERE id = ?",
                [status, json.dumps(metrics or {}, default=str), error, run_id],
            )

    def training_runs(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT id, kind, status, started_at, finished_at, metrics, error "
            "FROM training_runs ORDER BY started_at"
        )
        for r in rows:
            r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
        return rows

    def new_decisive_votes(self) -> tuple[int, float | None]:
        """(decisive votes since the last cycle started, minutes since then or None if never)."""
        rows = self._rows(
            "WITH last AS (SELECT max(started_at) AS t FROM training_runs WHERE kind = 'cycle') "
            "SELECT (SELECT count(*) FROM votes, last "
            "        WHERE choice IN ('a', 'b') AND flagged IS NULL "
            "        AND (last.t IS NULL OR created_at > last.t)) AS n, "
            "       (SELECT epoch(now() - t) / 60 FROM last) AS minutes"
        )
        return rows[0]["n"], rows[0]["minutes"]

    def new_vote_sources(self) -> dict[str, Any]:
        """Where the decisive votes since the last cycle came from: their number and the share
        of the largest single session and of the largest single client address (votes without
        one count as their own source each)."""
        rows = self._rows(
            "WITH last AS (SELECT max(started_at) AS t FROM training_runs WHERE kind = 'cycle'), "
            "new AS (SELECT session_id, client FROM votes, last WHERE choice IN ('a', 'b') "
            "        AND flagged IS NULL AND (last.t IS NULL OR created_at > last.t)) "
            "SELECT (SELECT count(*) FROM new) AS n, "
            "  (SELECT coalesce(max(k), 0) FROM (SELECT count(*) AS k FROM new "
            "   WHERE session_id IS NOT NULL GROUP BY session_id)) AS top_session, "
            "  (SELECT coalesce(max(k), 0) FROM (SELECT count(*) AS k FROM new "
            "   WHERE client IS NOT NULL GROUP BY client)) AS top_client"
        )[0]
        n = rows["n"]
        return {
            "votes": n,
            "top_session_share": rows["top_session"] / n if n else 0.0,
            "top_address_share": rows["top_client"] / n if n else 0.0,
        }

    def refuse_cycle(self, reason: str, metrics: dict) -> None:
        """A cycle refused before it started, recorded as one (so its votes are not counted
        again as new, and the Admin tab lists it with the reason)."""
        run_id = self.start_run("cycle", {"refused": True})
        self.finish_run(run_id, "refused", metrics, reason)

    def logged_prompts(self) -> list[list[dict[str, str]]]:
        """Every distinct prompt sent to the engine, for PPO rollouts."""
        rows = self._rows("SELECT DISTINCT CAST(prompt AS VARCHAR) AS p FROM pairs")
        return [json.loads(r["p"]) for r in rows]

    def model_versions(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT version, parent, path, status, manifest, created_at FROM model_versions "
            "ORDER BY created_at, version"
        )
        for r in rows:
            r["manifest"] = json.loads(r["manifest"]) if r["manifest"] else {}
            r["created_at"] = r["created_at"].isoformat()
        return rows
