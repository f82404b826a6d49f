"""Postgres as the store's database (`--db postgresql://...`): everything in which it differs
from DuckDB for this store, in one place.

The store's SQL is written once, in the dialect the two share. What differs is handled here:

- parameters: the store writes `?` and `$name`, psycopg takes `%s` and `%(name)s`;
- the few DuckDB functions the store calls (`epoch`, `json_extract_string`, `to_milliseconds`,
  `json_merge_patch`) are defined as SQL functions in the database, once per open;
- column types in the migrations: DuckDB's `DOUBLE` is `DOUBLE PRECISION` here; `JSON` stays
  JSON (kept as written, like DuckDB's), and reads come back as its text, as DuckDB gives them;
- a statement without a result (an UPDATE, a DELETE) answers with its row count, as DuckDB's do;
- errors: a unique key taken by a concurrent transaction, a serialization failure or a deadlock
  is a write conflict (run again); a lost connection or a server that is down is a 503 with
  Retry-After; a full disk is one, too.

Each thread holds its own connection (as each holds its own DuckDB cursor), in autocommit with
explicit `BEGIN`/`COMMIT` around the store's transactions, so that a read outside one sees what
is committed. `synchronous_commit` is on for every connection: a commit that returned is on the
server's disk (and on its synchronous standbys, if any): a vote is acknowledged after it.
psycopg is imported here only: a DuckDB install never needs it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from storage.errors import (
    DatabaseUnavailableError,
    StorageWriteError,
    StoreError,
    WriteConflictError,
)

SCHEMES = ("postgresql://", "postgres://")
MIGRATION_LOCK = 7_301_115_001  # pg_advisory_lock key: one process migrates at a time

# DuckDB's functions that the store's SQL calls, for Postgres (`CREATE OR REPLACE`: idempotent).
_FUNCTIONS = """
CREATE OR REPLACE FUNCTION epoch(interval) RETURNS double precision
    LANGUAGE sql IMMUTABLE AS $$ SELECT extract(epoch FROM $1)::double precision $$;
CREATE OR REPLACE FUNCTION json_extract_string(json, text) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$ SELECT $1 #>> string_to_array(substr($2, 3), '.') $$;
CREATE OR REPLACE FUNCTION to_milliseconds(bigint) RETURNS interval
    LANGUAGE sql IMMUTABLE AS $$ SELECT $1 * interval '1 millisecond' $$;
CREATE OR REPLACE FUNCTION json_merge_patch(json, text) RETURNS json
    LANGUAGE sql IMMUTABLE AS $$ SELECT (coalesce($1::jsonb, '{}'::jsonb) || $2::jsonb)::json $$;
"""


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def migration_sql(sql: str) -> str:
    """A migration written for DuckDB, as Postgres spells its types."""
    return re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", sql)


def translate(sql: str, params: Any) -> tuple[str, Any]:
    """The store's placeholders (`?`, `$name`) as psycopg's, and `%` escaped, outside quoted
    strings. Without parameters the SQL goes as written."""
    if not params:
        return sql, None
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "'":
            end = sql.index("'", i + 1)
            while end + 1 < n and sql[end + 1] == "'":  # '' inside a string
                end = sql.index("'", end + 2)
            out.append(sql[i : end + 1].replace("%", "%%"))
            i = end + 1
            continue
        if ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and isinstance(params, dict):
            name = re.match(r"\$([A-Za-z_]\w*)", sql[i:])
            if name:
                out.append(f"%({name.group(1)})s")
                i += len(name.group(0))
                continue
            out.append(ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out), params


class _Count:
    """A statement's answer when it returns no rows: its row count, as DuckDB answers."""

    description = (("Count",),)

    def __init__(self, rowcount: int) -> None:
        self._row = (max(rowcount, 0),)

    def fetchone(self) -> tuple[int]:
        return self._row

    def fetchall(self) -> list[tuple[int]]:
        return [self._row]


class PostgresConnection:
    """One thread's connection, with the DuckDB connection's methods that the store uses."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.types.numeric import FloatLoader
        from psycopg.types.string import TextLoader

        self.url = url
        try:
            self._con = psycopg.connect(
                url, autocommit=True, connect_timeout=10, options="-c synchronous_commit=on"
            )
        except psycopg.Error as exc:
            raise unavailable(url, exc) from exc
        for json_type in ("json", "jsonb"):
            self._con.adapters.register_loader(json_type, TextLoader)  # text, as DuckDB gives
        self._con.adapters.register_loader("numeric", FloatLoader)  # epoch() and sums: floats

    @property
    def broken(self) -> bool:
        return self._con.closed or self._con.broken

    @property
    def idle(self) -> bool:
        """No transaction open on it (as far as this side knows: a server that dropped it
        unseen leaves it idle here until a statement fails)."""
        from psycopg.pq import TransactionStatus

        return self._con.info.transaction_status == TransactionStatus.IDLE

    def execute(self, sql: str, params: Any = None) -> Any:
        query, args = translate(sql, params)
        cursor = self._con.execute(query, args, prepare=False)
        return cursor if cursor.description is not None else _Count(cursor.rowcount)

    def executemany(self, sql: str, rows: Any) -> None:
        rows = list(rows)
        if rows:
            query, _ = translate(sql, rows[0])
            with self._con.cursor() as cursor:
                cursor.executemany(query, rows)

    def begin(self) -> None:
        self._con.execute("BEGIN")

    def commit(self) -> None:
        self._con.execute("COMMIT")

    def rollback(self) -> None:
        if not self.broken:
            self._con.execute("ROLLBACK")

    def cursor(self) -> PostgresConnection:
        return self

    def close(self) -> None:
        self._con.close()


def open_connection(url: str) -> PostgresConnection:
    return PostgresConnection(url)


def prepare(con: PostgresConnection) -> None:
    """DuckDB's functions, defined once per open (concurrent opens: under the migration lock)."""
    con.execute(_FUNCTIONS)


def unavailable(url: str, exc: BaseException) -> DatabaseUnavailableError:
    return DatabaseUnavailableError(redacted(url), str(exc))


def translated(exc: BaseException, url: str) -> StoreError | None:
    """psycopg's error as one of ours when it is about the storage, else None."""
    import psycopg
    from psycopg import errors

    if isinstance(
        exc, errors.UniqueViolation | errors.SerializationFailure | errors.DeadlockDetected
    ):
        return WriteConflictError(str(exc))
    if isinstance(exc, errors.DiskFull | errors.OutOfMemory):
        return StorageWriteError(redacted(url), f"no space left on device: {exc}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return unavailable(url, exc)
    return None
