"""Canaries, the votes on pairs that straddle two versions and each version's recent replies:
the rows the users' verdict on a new version, its rating and its monitors are computed from.
Mixed into `Store`, which owns the connection and transactions.

A canary row says which challenger ran against which serving version, as what adapter, on what
share of pairs, and how it ended. The counts themselves are never stored: they are read from the
votes each time (a deleted conversation's votes drop out of them, as from everything else).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from storage.errors import ConflictError
from storage.rules import BOTH_CANDIDATES, new_id


class CanaryRecords:
    """Requires `_transaction()` and `_rows()` (see `Store`)."""

    def start_canary(
        self, challenger: str, parent: str, adapter: str, share: float, manifest: dict
    ) -> str:
        """Record the version as `challenger` and its canary as running, in one transaction."""
        canary_id = new_id()
        with self._transaction() as con:
            if con.execute("SELECT 1 FROM canaries WHERE decision = 'running'").fetchone():
                raise ConflictError("a canary is already running: one challenger at a time")
            con.execute(
                "INSERT INTO model_versions (version, parent, path, status, manifest) "
                "VALUES (?, ?, ?, 'challenger', ?)",
                [challenger, parent, manifest.pop("path"), json.dumps(manifest, default=str)],
            )
            con.execute(
                "INSERT INTO canaries (id, challenger, serving, adapter, share) "
                "VALUES (?, ?, ?, ?, ?)",
                [canary_id, challenger, parent, adapter, share],
            )
        return canary_id

    def running_canary(self) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT * FROM canaries WHERE decision = 'running' ORDER BY started_at DESC LIMIT 1"
        )
        return rows[0] if rows else None

    def latest_canary(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM canaries ORDER BY started_at DESC LIMIT 1")
        return rows[0] if rows else None

    def finish_canary(
        self, canary_id: str, decision: str, reason: str, decided_at: Any = None
    ) -> None:
        """Close a canary as of `decided_at` (now by default). A challenger not promoted becomes
        `retired` (served again only by an admin's rollback). A promotion is closed by
        `set_serving(..., ending=CanaryEnd(...))` instead, in the swap's own transaction."""
        with self._transaction() as con:
            close_canary(con, CanaryEnd(canary_id, decision, reason, decided_at))

    def cross_version_votes(
        self, versions: tuple[str, str] | None = None, until: Any = None
    ) -> list[dict[str, Any]]:
        """Unflagged votes on pairs whose two candidates came from different versions, oldest
        first: choice, both versions, when it was cast and where from (session, client tag),
        both replies' texts (`text_a`, `text_b`: style-controlled judging reads their length
        and markdown, `alignment.style_control`);
        only pairs of exactly these two versions when `versions` is given, only votes cast up
        to `until` (a decided canary's verdict) when that is given."""
        where, params = "a.model_version <> b.model_version AND v.flagged IS NULL", []
        if versions is not None:
            where += " AND a.model_version IN (?, ?) AND b.model_version IN (?, ?)"
            params = [*versions, *versions]
        if until is not None:
            where += " AND v.created_at <= ?"
            params.append(until)
        return self._rows(
            "SELECT v.choice, a.model_version AS version_a, b.model_version AS version_b, "
            "v.created_at AS voted_at, v.session_id, v.client, a.text AS text_a, b.text AS text_b "
            f"FROM votes v JOIN pairs p ON p.id = v.pair_id {BOTH_CANDIDATES} "
            f"WHERE {where} ORDER BY v.created_at, v.id",
            params,
        )

    def canaries(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM canaries ORDER BY started_at")

    def recent_replies(self, per_version: int = 400) -> list[dict[str, Any]]:
        """The latest `per_version` candidates of each version (text, finish reason): what the
        reward-hacking monitors look at."""
        return self._rows(
            "SELECT model_version, text, finish_reason FROM ("
            "  SELECT model_version, text, finish_reason, row_number() OVER ("
            "    PARTITION BY model_version ORDER BY created_at DESC) AS k FROM candidates"
            ") AS ranked WHERE k <= ?",
            [per_version],
        )


@dataclass(frozen=True)
class CanaryEnd:
    """How a running canary ends: recorded in the same transaction as the serving version when
    it is a promotion, so no reader sees the challenger serving while its canary still runs."""

    canary_id: str
    decision: str  # 'promoted', 'retired' or 'interrupted'
    reason: str
    decided_at: Any = None  # the verdict stands on the votes cast until then (default: now)


def close_canary(con, end: CanaryEnd) -> None:
    row = con.execute(
        "UPDATE canaries SET decision = ?, reason = ?, "
        "decided_at = coalesce(?::TIMESTAMPTZ, now()) "
        "WHERE id = ? AND decision = 'running' RETURNING challenger",
        [end.decision, end.reason, end.decided_at, end.canary_id],
    ).fetchone()
    if row is not None and end.decision != "promoted":
        con.execute(
            "UPDATE model_versions SET status = 'retired' "
            "WHERE version = ? AND status = 'challenger'",
            [row[0]],
        )
