"""Erasing deleted conversations from the database file: it is rewritten with the live rows only.

Measured on DuckDB 2.0.1 (tests/test_chats_at_rest.py): after `DELETE` and `CHECKPOINT` a deleted
message's text is still in the file (`strings FILE | grep TEXT` finds it). A row group keeps
deleted rows behind a delete mask, and the blocks a checkpoint frees are reused later, never
zeroed; overwriting the text before the delete (`UPDATE`, then `DELETE`) and `VACUUM` leave it
there all the same. What removes it is a new file holding only the live rows: `COPY FROM
DATABASE` into `<db>.compact`, synced, renamed over the database.

When: a deletion first leaves a marker (`<db>.erase`, synced); the store compacts when it closes
(the app's clean stop) and, after a crash, when it is next opened, before anything else reads
or writes the file; `assistant compact` does it by hand while the app is stopped. So a deleted
conversation's text is gone from the database file by the app's next stop or start.

Safe against writers and crashes: it runs only with the store closed; the copy is made under a
read-only attach, whose lock keeps any other writer out until the rename; the new file is synced
before it replaces the old, and the marker goes only after that (a crash at any point leaves the
old file whole, or the new one, and the marker to try again). A `<db>.wal` beside the old file
stops it: that would be replayed onto the new one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import duckdb

from storage.errors import DatabaseInUseError, StoreError
from storage.private import private_file

log = logging.getLogger(__name__)


def erase_marker(database: Path) -> Path:
    return database.with_name(database.name + ".erase")


def _wal(database: Path) -> Path:
    return database.with_name(database.name + ".wal")


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_erasure(database: Path) -> None:
    """Before a deletion: the file must be compacted (durably noted, so a crash keeps it)."""
    marker = erase_marker(database)
    if not marker.exists():
        marker.touch(mode=0o600)
        _fsync(marker)
        _fsync(database.parent)


def compact(database: Path) -> tuple[int, int]:
    """Rewrite `database` with its live rows only; returns its size (bytes) before and after.
    The database must not be open in this process; another process holding it is refused."""
    if not database.exists():
        raise StoreError(f"no database at {database}; pass --db")
    tmp = database.with_name(database.name + ".compact")
    for leftover in (tmp, _wal(tmp)):  # a crash's, never renamed
        leftover.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(database))  # the WAL into the file first
        con.execute("CHECKPOINT")
        con.close()
        con = duckdb.connect()
    except duckdb.IOException as exc:
        raise DatabaseInUseError(
            f"cannot compact {database}: {str(exc).splitlines()[0]} (stop the app first: it "
            "compacts by itself when it stops)"
        ) from exc
    try:
        con.execute(f"ATTACH {_quoted(database)} AS live (READ_ONLY)")  # writers stay out
        before = database.stat().st_size
        con.execute(f"ATTACH {_quoted(tmp)} AS fresh")
        con.execute("COPY FROM DATABASE live TO fresh")
        con.execute("DETACH fresh")
        if _wal(database).exists() or _wal(tmp).exists():
            raise StoreError(f"cannot compact {database}: a WAL appeared beside it; run it again")
        private_file(tmp)
        _fsync(tmp)
        os.replace(tmp, database)
        _fsync(database.parent)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)
    erase_marker(database).unlink(missing_ok=True)
    _fsync(database.parent)
    after = database.stat().st_size
    log.info("compacted %s: %d -> %d bytes", database, before, after)
    return before, after


def compact_if_marked(database: Path) -> None:
    """Compact when a deletion asked for it (`mark_erasure`). A failure other than the file
    being in use (a disk too full for the copy) is logged and leaves the marker for next time:
    the app still starts and stops."""
    if not (erase_marker(database).exists() and database.exists()):
        return
    try:
        compact(database)
    except DatabaseInUseError:
        raise
    except (StoreError, duckdb.Error, OSError):
        log.exception("deleted conversations stay in %s until it is compacted", database)
