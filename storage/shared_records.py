"""What several app processes on one Postgres database must agree on, kept in the database
rather than in each process's data directory or memory: the keys every process signs with
(sessions, client tags) and the generated admin token (`shared_key`), and the live admin
sign-ins of the page (one process signs an admin in, another accepts the cookie, a sign-out on
any of them ends it everywhere). Mixed into `Store`, which owns the connection and transactions.

A DuckDB app is one process: it keeps its key and token in its data directory and its sign-ins
in memory, and never calls these (its tables stay empty).
"""

from __future__ import annotations

from collections.abc import Callable


class SharedRecords:
    """Requires `_transaction()` and `_rows()` (see `Store`)."""

    def shared_key(self, name: str, make: Callable[[], str]) -> str:
        """The value stored under `name`, stored first as `make()` when there is none. Processes
        that start at once each offer their own value; the first insert wins (the others'
        `ON CONFLICT DO NOTHING` wait for it and do nothing), and all of them read that one."""
        with self._transaction() as con:
            con.execute(
                "INSERT INTO shared_keys (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [name, make()],
            )
        # read after the commit: on Postgres the winner's row is committed by now
        return self._rows("SELECT value FROM shared_keys WHERE name = ?", [name])[0]["value"]

    # --- the page's admin sign-ins (`assistant.admin.SharedSignIns`) ------------------------
    # Only the hash of a sign-in id is stored: the id is the cookie, a bearer token.

    def add_sign_in(self, id_hash: str, issued_at: float, keep: int | None = None) -> None:
        """Record a sign-in issued at `issued_at` (seconds since the epoch); with `keep`, only
        the newest `keep` sign-ins stay (the oldest go first, as in memory)."""
        with self._transaction() as con:
            con.execute(
                "INSERT INTO admin_sign_ins (id_hash, issued_at) VALUES (?, ?)",
                [id_hash, issued_at],
            )
            if keep is not None:
                con.execute(
                    "DELETE FROM admin_sign_ins WHERE id_hash IN (SELECT id_hash FROM "
                    "admin_sign_ins ORDER BY issued_at DESC, id_hash OFFSET ?)",
                    [keep],
                )

    def sign_in_issued_at(self, id_hash: str) -> float | None:
        """When the sign-in was issued; None if it is not live (never issued, or revoked)."""
        rows = self._rows("SELECT issued_at FROM admin_sign_ins WHERE id_hash = ?", [id_hash])
        return float(rows[0]["issued_at"]) if rows else None

    def revoke_sign_in(self, id_hash: str) -> None:
        with self._transaction() as con:
            con.execute("DELETE FROM admin_sign_ins WHERE id_hash = ?", [id_hash])

    def forget_sign_ins_before(self, t: float) -> None:
        """Drop the sign-ins issued before `t` (expired)."""
        with self._transaction() as con:
            con.execute("DELETE FROM admin_sign_ins WHERE issued_at < ?", [t])

    def sign_in_count(self) -> int:
        return int(self._rows("SELECT count(*) AS n FROM admin_sign_ins")[0]["n"])
