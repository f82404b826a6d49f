"""Retrain cycles asked for on an app process that does not lead (several processes on one
Postgres): the request waits in the database until the leader starts it and writes back the run
id (or why it refused), so `POST /api/retrain` answers the same on every process."""

from __future__ import annotations

from typing import Any

from storage.rules import new_id


class CycleRequests:
    """Requires `_transaction()` and `_rows()` (see `Store`)."""

    def request_cycle(self) -> str:
        request_id = new_id()
        with self._transaction() as con:
            con.execute("INSERT INTO cycle_requests (id) VALUES (?)", [request_id])
        return request_id

    def cycle_request(self, request_id: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT id, run_id, error, status FROM cycle_requests WHERE id = ?", [request_id]
        )
        return rows[0] if rows else None

    def pending_cycle_requests(self) -> list[str]:
        rows = self._rows(
            "SELECT id FROM cycle_requests WHERE answered_at IS NULL ORDER BY requested_at, id"
        )
        return [r["id"] for r in rows]

    def answer_cycle_request(
        self, request_id: str, run_id: str | None, error: str | None = None, status: int = 200
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "UPDATE cycle_requests SET run_id = ?, error = ?, status = ?, answered_at = now() "
                "WHERE id = ?",
                [run_id, error, status, request_id],
            )
