"""The DuckDB file: opening it, migrating it, and the one transaction helper every write uses.

DuckDB allows a single read-write process per file, so the app process owns the connection.
Inside the process each thread gets its own cursor (a connection to the same database
instance) and DuckDB's MVCC runs their transactions side by side: a vote does not wait for
another request's statements. Under load, one shared connection behind a lock made every vote
queue behind every other call (400 ms at the median with 32 users; bench/RESULTS.md). Two
transactions that write the same row conflict; `write` retries those, and a key that is taken
(a second vote on a pair) surfaces as the caller's own ConflictError.

Each write is one transaction; once `commit` returns, DuckDB has written and synced its WAL, so
an acknowledged vote survives `kill -9` of the app.

The writes of the request path (a turn's pair, a vote) go through one writer thread that commits
what has queued up together (`_write_grouped`, a group commit): under load every commit's WAL
sync and DuckDB's commit lock were where a vote waited (a commit's p99 was 110-170 ms with 32
users on 2 cores against 1 ms alone; bench/RESULTS.md), and a thread pool shared with the turns
queued the votes behind them. Those writes also run a batch of their kind in a few statements
(`storage.request_writes`); a refused vote answers for itself and writes nothing, and a batch
that fails as a whole (a database error) reruns each write in a transaction of its own, so one
write never takes another with it.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb

from storage import postgres
from storage.errors import (
    DatabaseInUseError,
    DatabaseUnavailableError,
    StorageWriteError,
    StoreError,
    WriteConflictError,
)
from storage.migrations import MIGRATIONS
from storage.private import private_file, private_folder

T = TypeVar("T")

# DuckDB reports a failed write as an IOException, or at commit as a TransactionException
# wrapping "Could not write file ..."; the latter also covers logic errors, hence the wording test.
_IO_WORDS = ("could not write", "no space left", "read-only file system", "input/output error")
WRITE_ATTEMPTS = 5
GROUP_COMMIT_MAX = 64  # writes committed together at most


def _is_io_failure(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.IOException) or any(w in str(exc).lower() for w in _IO_WORDS)


def _is_conflict(exc: duckdb.Error) -> bool:
    """Two transactions wrote the same row or key at once (MVCC): the one that loses learns it
    as a write-write conflict, or at commit as a key the other just took. Run from the start
    again, it sees the winner's rows (a second vote on a pair is then refused as such)."""
    message = str(exc).lower()
    return isinstance(exc, duckdb.TransactionException) and (
        "conflict" in message or "constraint violation" in message
    )


class Database:
    """One DuckDB file, schema migrated on open; a cursor per thread."""

    def __init__(self, location: Path | str, *, read_only: bool = False) -> None:
        # `location`: the DuckDB file, or a postgresql:// URL (`storage.postgres`)
        self.url = location if postgres.is_postgres_url(location) else None
        self.path: Path | None = None if self.url else Path(location)
        self.location = postgres.redacted(self.url) if self.url else str(self.path)
        self._local = threading.local()
        self._cursors: list[Any] = []
        self._cursors_lock = threading.Lock()
        self._group = _GroupCommit(self)
        self._con: duckdb.DuckDBPyConnection | None = None
        if self.url:
            if not read_only:
                self._migrate()
            return
        if not read_only:
            private_folder(self.path.parent)  # DuckDB's WAL there gets the umask's mode
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
            private_file(self.path)
            self._migrate()

    @property
    def on_postgres(self) -> bool:
        return self.url is not None

    def close(self) -> None:
        self._group.close()  # what is queued is committed first
        with self._cursors_lock:
            for cursor in self._cursors:
                cursor.close()
            self._cursors.clear()
        if self._con is not None:
            self._con.close()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (DuckDB connections are not to be shared between threads).
        Outside the writer thread, once the writes acknowledged before it are stored."""
        if not getattr(self._local, "writes_may_lag", False):
            self._await_acknowledged_writes()
        cursor = getattr(self._local, "cursor", None)
        if cursor is not None and self.url and cursor.broken:  # the server restarted: reconnect
            self._drop_cursor(cursor)
            cursor = None
        if cursor is None:
            # Postgres: a connection per thread; DuckDB: a cursor of the one connection
            cursor = postgres.open_connection(self.url) if self.url else self._con.cursor()
            with self._cursors_lock:
                self._cursors.append(cursor)
            self._local.cursor = cursor
        return cursor

    def _drop_cursor(self, cursor: Any) -> None:
        self._local.cursor = None
        with self._cursors_lock:
            if cursor in self._cursors:
                self._cursors.remove(cursor)
        with contextlib.suppress(Exception):
            cursor.close()

    def _await_acknowledged_writes(self) -> None:
        """Writes acknowledged before they were stored (the store's journaled votes) must be
        in DuckDB before a read: nothing to wait for here."""

    @contextmanager
    def _reads_may_lag(self) -> Iterator[None]:
        """Reads on this thread that account themselves for acknowledged, unstored writes."""
        self._local.writes_may_lag = True
        try:
            yield
        finally:
            self._local.writes_may_lag = False

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction on this thread's cursor: all of it is committed, or none of it."""
        con = self._cursor()
        try:
            con.begin()
        except Exception as exc:  # noqa: BLE001 - Postgres: the connection was lost
            con = self._reconnected(exc, con)  # nothing has run yet: once more on a new one
            try:
                con.begin()
            except Exception as again:  # noqa: BLE001 - the server is still down
                self._raise_translated(again, con)
                raise
        try:
            yield con
        except BaseException as exc:
            try:
                con.rollback()
            except Exception:  # noqa: BLE001 - the connection is gone; the server rolls back
                self._drop_cursor(con)
            self._raise_translated(exc, con)
            raise
        try:
            con.commit()  # a failed commit leaves no transaction open
        except Exception as exc:  # noqa: BLE001 - translated below, or raised as it is
            self._raise_translated(exc, con)
            raise

    def _reconnected(self, exc: BaseException, con: Any) -> Any:
        """Postgres: a new connection for this thread when `exc` is its old one found dropped
        by the server (a restart while the thread left it idle: the first statement after it
        learns so) and what failed may simply run again; else `exc`, translated."""
        translated = postgres.translated(exc, self.url) if self.url else None
        if isinstance(translated, DatabaseUnavailableError) and con.broken:
            self._drop_cursor(con)
            return self._cursor()  # the server still down: a 503 from the connect
        self._raise_translated(exc, con)
        raise exc

    def _raise_translated(self, exc: BaseException, con: Any) -> None:
        """Raise the driver's error as one of ours when it is about the storage."""
        if self.url:
            translated = postgres.translated(exc, self.url)
            if translated is not None and translated.status == 503 and con.broken:
                self._drop_cursor(con)  # the next call reconnects
        elif isinstance(exc, duckdb.Error):
            translated = _translated(exc, self.path)
        else:
            translated = None
        if translated is not None:
            raise translated from exc

    def _write(self, body: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `body` in a transaction, again (from the start) when it lost a write conflict.
        `body` must have no effect outside the database, or be safe to repeat."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._transaction() as con:
                    return body(con)
            except WriteConflictError:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                time.sleep(0.002 * 2**attempt)
        raise AssertionError("unreachable")

    def _write_grouped(self, body: Callable[[duckdb.DuckDBPyConnection], T] | Any) -> Future:
        """`_write(body)` on the writer thread, committed together with the writes queued beside
        it; the future resolves once it is durable (or with its error). Same contract for
        `body` as `_write`: it may run more than once, so it must be safe to repeat. `body` may
        also be a `BatchedWrite`, which runs with the others of its class."""
        return self._group.submit(body)

    def _append_version(self, table: str, values: dict[str, Any]) -> int:
        """Insert `values` as the next numbered version of a history table (constitutions,
        prompt variants: edits never overwrite); returns the number."""
        columns = ", ".join(["version", *values])
        marks = ", ".join("?" * (len(values) + 1))
        with self._transaction() as con:
            version = con.execute(f"SELECT coalesce(max(version), 0) + 1 FROM {table}").fetchone()[
                0
            ]
            con.execute(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})", [version, *values.values()]
            )
        return version

    def _rows(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        con = self._cursor()
        idle = self.url is not None and con.idle  # not in a transaction: a read may run again
        try:
            cur = con.execute(sql, params)
        except Exception as exc:  # noqa: BLE001 - translated below, or raised as it is
            if not idle:
                self._raise_translated(exc, con)
                raise
            con = self._reconnected(exc, con)
            try:
                cur = con.execute(sql, params)
            except Exception as again:  # noqa: BLE001 - the server is still down
                self._raise_translated(again, con)
                raise
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _prompt_rows(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        """Rows whose `prompt` column holds the JSON message list sent to the engine."""
        rows = self._rows(sql, params)
        for r in rows:
            r["prompt"] = json.loads(r["prompt"])
        return rows

    # --- conversations ------------------------------------------------------------------

    def _migrate(self) -> None:
        con = self._cursor() if self.url else self._con
        if self.url:  # several app processes may start at once: one migrates, the others wait
            try:
                con.execute("SELECT pg_advisory_lock(?)", [postgres.MIGRATION_LOCK])
            except Exception as exc:  # noqa: BLE001 - translated, or raised as it is
                self._raise_translated(exc, con)
                raise
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "description VARCHAR, applied_at TIMESTAMPTZ DEFAULT now())"
            )
            if self.url:
                postgres.prepare(con)
            done = {r[0] for r in con.execute("SELECT version FROM schema_migrations").fetchall()}
            for version, description, step in MIGRATIONS:
                if version in done:
                    continue
                with self._transaction() as tx:
                    if callable(step):
                        step(tx)
                    else:
                        tx.execute(postgres.migration_sql(step) if self.url else step)
                    tx.execute(
                        "INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                        [version, description],
                    )
        finally:
            if self.url and not con.broken:
                con.execute("SELECT pg_advisory_unlock(?)", [postgres.MIGRATION_LOCK])


class _GroupCommit:
    """The writer thread behind `Database._write_grouped`, started on the first write."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, body: Callable[[duckdb.DuckDBPyConnection], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise StoreError(f"the database {self._db.location} is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="duckdb-group-commit", daemon=True
                )
                self._thread.start()
            self._queue.put((body, future))
        return future

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        self._db._local.writes_may_lag = True  # the writer is what stores them
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < GROUP_COMMIT_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit([(body, f) for body, f in batch if f.set_running_or_notify_cancel()])
            if stop:
                return

    def _commit(self, batch: list[tuple[Any, Future]]) -> None:
        """All of the batch in one transaction. A write of the request path (`BatchedWrite`)
        runs with the others of its kind and answers for itself (a refused vote gets its error,
        the rest are stored); a plain body that raises, or any database error, sends every write
        of the batch to a transaction of its own."""
        if len(batch) > 1:
            try:
                outcomes = self._db._write(lambda con: _run_together(con, [w for w, _ in batch]))
            except BaseException:  # noqa: BLE001 - each write runs alone below and gets its own
                pass
            else:
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    _settle(future, outcome)
                return
        for write, future in batch:
            try:
                _settle(future, self._db._write(lambda con, w=write: _run_together(con, [w])[0]))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on it
                future.set_exception(exc)


class BatchedWrite(Protocol):
    """A write that runs together with the others of its class in a batch, in a few statements
    for all of them; `run_batch` gives each its result or its own exception (which must then
    have written nothing)."""

    @classmethod
    def run_batch(cls, con: duckdb.DuckDBPyConnection, writes: list) -> list: ...


def _run_together(con: duckdb.DuckDBPyConnection, writes: list) -> list:
    """The outcome of each write, in order: plain bodies one by one, batched writes by class."""
    outcomes: list = [None] * len(writes)
    kinds: dict[type, list[int]] = {}
    for i, write in enumerate(writes):
        if hasattr(write, "run_batch"):
            kinds.setdefault(type(write), []).append(i)
        else:
            outcomes[i] = write(con)
    # A kind that `runs_first` (acknowledged votes) goes before the rest: what was queued after
    # it may build on it (a turn's position follows the reply its vote continued with).
    ordered = sorted(kinds.items(), key=lambda item: not getattr(item[0], "runs_first", False))
    for kind, positions in ordered:
        results = kind.run_batch(con, [writes[i] for i in positions])
        for i, result in zip(positions, results, strict=True):
            outcomes[i] = result
    return outcomes


def _settle(future: Future, outcome: Any) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _translated(exc: duckdb.Error, path: Path) -> StoreError | None:
    """The driver's error as one of ours when it is about the storage, else None."""
    if _is_io_failure(exc):
        return StorageWriteError(path, str(exc))
    if _is_conflict(exc):
        return WriteConflictError(str(exc))
    return None
