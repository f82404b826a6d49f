"""Reads only the tests need: a pair with its candidates and vote, and the like. They reach into
the store's connection on purpose; the product has no use for them."""

from __future__ import annotations

import json
from typing import Any

from storage import NotFoundError, Store


def schema_version(store: Store) -> int:
    return store._rows("SELECT max(version) AS v FROM schema_migrations")[0]["v"] or 0


def count(store: Store, table: str) -> int:
    if table not in {"conversations", "messages", "pairs", "candidates", "votes"}:
        raise ValueError(f"unknown table {table!r}")
    return store._rows(f"SELECT count(*) AS n FROM {table}")[0]["n"]


def conversation_exists(store: Store, conversation_id: str) -> bool:
    return bool(store._rows("SELECT 1 FROM conversations WHERE id = ?", [conversation_id]))


def pair(store: Store, pair_id: str) -> dict[str, Any]:
    rows = store._rows("SELECT * FROM pairs WHERE id = ?", [pair_id])
    if not rows:
        raise NotFoundError(f"unknown pair_id {pair_id!r}")
    out = rows[0]
    out["prompt"] = json.loads(out["prompt"])
    out["candidates"] = store._rows(
        "SELECT * FROM candidates WHERE pair_id = ? ORDER BY slot", [pair_id]
    )
    votes = store._rows("SELECT * FROM votes WHERE pair_id = ?", [pair_id])
    out["vote"] = votes[0] if votes else None
    return out


def cai_skips(store: Store) -> list[dict[str, Any]]:
    return store._rows("SELECT item_id, kind, reason, attempts FROM cai_skips ORDER BY created_at")


def vote_ids(store: Store) -> set[str]:
    return {r["id"] for r in store._rows("SELECT id FROM votes")}
