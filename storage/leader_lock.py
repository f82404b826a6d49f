"""Which app process leads, when several share one Postgres: a session-level advisory lock.

One process at a time holds the lock on a connection of its own, for as long as it lives; the
scheduler, the canary's decisions, pruning, retention and the critique worker run there only.
The lock goes with the connection: a leader that dies (SIGKILL, a lost machine) releases it as
soon as Postgres sees its connection close, and another process takes it at its next try. On
DuckDB there is one process, and it leads.
"""

from __future__ import annotations

import contextlib

from storage.postgres import redacted

LEADER_LOCK = 7_301_115_002  # pg_advisory_lock key (the migrations' is ...001)


class LeaderLock:
    """`try_acquire()` until it returns True; `holds()` says whether it is still ours (False once
    its connection is lost: another process may lead by then)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._con = None
        self._held = False

    def try_acquire(self) -> bool:
        import psycopg

        if self._held and self.holds():
            return True
        self._reset()
        try:
            self._con = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            row = self._con.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK]).fetchone()
        except psycopg.Error:
            self._reset()
            return False
        self._held = bool(row and row[0])
        if not self._held:
            self._reset()  # no connection kept while another process leads
        return self._held

    def holds(self) -> bool:
        """Still ours: the connection answers (a round trip; a lost one means lost lock)."""
        if not self._held or self._con is None:
            return False
        import psycopg

        try:
            self._con.execute("SELECT 1")
        except psycopg.Error:
            self._reset()
            return False
        return True

    def release(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._held = False
        if self._con is not None:
            with contextlib.suppress(Exception):
                self._con.close()
        self._con = None

    def __repr__(self) -> str:
        return f"LeaderLock({redacted(self.url)}, held={self._held})"
