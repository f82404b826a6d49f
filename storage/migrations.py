"""Numbered schema migrations for the DuckDB file.

Each entry is applied once, in order, inside a transaction, and recorded in `schema_migrations`.
An entry is SQL, or a function of the connection where a rule lives in Python (one home each).
Never edit a released migration: append a new one. The tables for the later stages (critiques,
training runs, model versions, deployments) exist from the start so that a database written by
this version can be read by the alignment loop without a rewrite.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from storage.rules import session_hash


def _hash_session_ids(con: duckdb.DuckDBPyConnection) -> None:
    """Session ids are bearer tokens: replace the ones stored so far by their hash."""
    for table in ("conversations", "votes"):
        ids = con.execute(
            f"SELECT DISTINCT session_id FROM {table} WHERE session_id IS NOT NULL"
        ).fetchall()
        if not ids:
            continue
        con.execute("CREATE OR REPLACE TEMP TABLE hashed_sessions (id VARCHAR, hash VARCHAR)")
        con.executemany(
            "INSERT INTO hashed_sessions VALUES (?, ?)", [(i, session_hash(i)) for (i,) in ids]
        )
        con.execute(
            f"UPDATE {table} SET session_id = h.hash FROM hashed_sessions h "
            f"WHERE {table}.session_id = h.id"
        )
        con.execute("DROP TABLE hashed_sessions")


MIGRATIONS: list[tuple[int, str, str | Callable[[duckdb.DuckDBPyConnection], None]]] = [
    (
        1,
        "conversations, messages, candidate pairs, candidates, votes",
        """
        CREATE TABLE conversations (
            id          VARCHAR PRIMARY KEY,
            session_id  VARCHAR,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        -- The transcript the model sees: user turns and the chosen assistant replies.
        -- A user turn voted both_bad is kept but marked superseded (the user asks again).
        CREATE TABLE messages (
            id              VARCHAR PRIMARY KEY,
            conversation_id VARCHAR NOT NULL REFERENCES conversations(id),
            position        INTEGER NOT NULL,
            role            VARCHAR NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content         VARCHAR NOT NULL,
            pair_id         VARCHAR,
            superseded      BOOLEAN NOT NULL DEFAULT false,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
            UNIQUE (conversation_id, position)
        );
        -- One user turn answered twice. `prompt` is the exact message list sent to the engine.
        CREATE TABLE pairs (
            id              VARCHAR PRIMARY KEY,
            conversation_id VARCHAR NOT NULL REFERENCES conversations(id),
            position        INTEGER NOT NULL,
            prompt          JSON NOT NULL,
            model_version   VARCHAR NOT NULL,
            seed            BIGINT NOT NULL,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE candidates (
            id                VARCHAR PRIMARY KEY,
            pair_id           VARCHAR NOT NULL REFERENCES pairs(id),
            slot              VARCHAR NOT NULL CHECK (slot IN ('a', 'b')),
            text              VARCHAR NOT NULL,
            model_version     VARCHAR NOT NULL,
            sampling          JSON NOT NULL,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            finish_reason     VARCHAR,
            latency_ms        DOUBLE,
            created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
            UNIQUE (pair_id, slot)
        );
        CREATE TABLE votes (
            id          VARCHAR PRIMARY KEY,
            pair_id     VARCHAR NOT NULL UNIQUE REFERENCES pairs(id),
            choice      VARCHAR NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
            voter       VARCHAR,
            session_id  VARCHAR,
            source      VARCHAR NOT NULL DEFAULT 'human',
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        2,
        "tables for the alignment stages: critiques, training runs, model versions, deployments",
        """
        CREATE TABLE critiques (
            id            VARCHAR PRIMARY KEY,
            candidate_id  VARCHAR NOT NULL REFERENCES candidates(id),
            round         INTEGER NOT NULL,
            principle     VARCHAR NOT NULL,
            critique      VARCHAR NOT NULL,
            revision      VARCHAR NOT NULL,
            model_version VARCHAR NOT NULL,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE training_runs (
            id          VARCHAR PRIMARY KEY,
            kind        VARCHAR NOT NULL,
            status      VARCHAR NOT NULL,
            started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
            finished_at TIMESTAMPTZ,
            config      JSON,
            metrics     JSON,
            error       VARCHAR
        );
        CREATE TABLE model_versions (
            version     VARCHAR PRIMARY KEY,
            parent      VARCHAR,
            path        VARCHAR NOT NULL,
            status      VARCHAR NOT NULL,
            manifest    JSON,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE deployments (
            id            VARCHAR PRIMARY KEY,
            version       VARCHAR NOT NULL,
            previous      VARCHAR,
            swap_seconds  DOUBLE,
            deployed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        3,
        "AI preference labels and constitution versions",
        """
        CREATE TABLE ai_labels (
            id            VARCHAR PRIMARY KEY,
            pair_id       VARCHAR NOT NULL REFERENCES pairs(id),
            choice        VARCHAR NOT NULL CHECK (choice IN ('a', 'b')),
            principle     VARCHAR NOT NULL,
            confidence    DOUBLE NOT NULL,
            p_a           DOUBLE NOT NULL,
            p_b           DOUBLE NOT NULL,
            source        VARCHAR NOT NULL DEFAULT 'ai',
            model_version VARCHAR NOT NULL,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE constitutions (
            version     INTEGER PRIMARY KEY,
            name        VARCHAR NOT NULL,
            body        JSON NOT NULL,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        4,
        "votes cast faster than a person could read both replies are kept but flagged",
        """
        ALTER TABLE votes ADD COLUMN flagged VARCHAR;
        """,
    ),
    (
        5,
        "constitutional-AI items given up after repeated failures, with the reason",
        """
        CREATE TABLE cai_skips (
            item_id     VARCHAR PRIMARY KEY,  -- a candidate (critique) or a pair (judge)
            kind        VARCHAR NOT NULL CHECK (kind IN ('critique', 'judge')),
            reason      VARCHAR NOT NULL,
            attempts    INTEGER NOT NULL,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        6,
        "which client a vote came from (a keyed tag of its address, never the address itself)",
        """
        ALTER TABLE votes ADD COLUMN client VARCHAR;
        """,
    ),
    (
        7,
        "canaries: a challenger version judged by the users on a share of pairs",
        """
        CREATE TABLE canaries (
            id          VARCHAR PRIMARY KEY,
            challenger  VARCHAR NOT NULL,
            serving     VARCHAR NOT NULL,
            adapter     VARCHAR NOT NULL,  -- the challenger: LoRA on the serving weights
            share       DOUBLE NOT NULL,
            decision    VARCHAR NOT NULL DEFAULT 'running'
                        CHECK (decision IN ('running', 'promoted', 'retired', 'interrupted')),
            reason      VARCHAR,
            started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
            decided_at  TIMESTAMPTZ
        );
        """,
    ),
    (
        8,
        "demonstrations: the reply a user wrote when both candidates were bad",
        """
        CREATE TABLE demonstrations (
            id          VARCHAR PRIMARY KEY,
            pair_id     VARCHAR NOT NULL UNIQUE REFERENCES pairs(id),
            text        VARCHAR NOT NULL,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        9,
        "prompt variants: every version of the file an admin saved (the newest is in force)",
        """
        CREATE TABLE prompt_variant_sets (
            version     INTEGER PRIMARY KEY,
            body        JSON NOT NULL,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        10,
        "session ids are kept only as their hash (an id is a bearer token)",
        _hash_session_ids,
    ),
    (
        11,
        "what app processes sharing one database agree on: signing keys, admin sign-ins",
        """
        CREATE TABLE shared_keys (
            name        VARCHAR PRIMARY KEY,
            value       VARCHAR NOT NULL,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        -- the page's live admin sign-ins: the hash of the cookie's id, never the id itself
        CREATE TABLE admin_sign_ins (
            id_hash     VARCHAR PRIMARY KEY,
            issued_at   DOUBLE NOT NULL  -- seconds since the epoch
        );
        """,
    ),
    (
        12,
        "retrain cycles asked for on a process that does not lead, until the leader answers",
        """
        CREATE TABLE cycle_requests (
            id            VARCHAR PRIMARY KEY,
            requested_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
            answered_at   TIMESTAMPTZ,
            run_id        VARCHAR,
            error         VARCHAR,
            status        INTEGER
        );
        """,
    ),
]
