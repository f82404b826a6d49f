"""Votes made durable on one appended line: the acknowledgement a vote waits for.

Under load (32 users and the vLLM engine on 2 cores) a vote that waited for its DuckDB commit
waited for a core at every thread hand-off: 210 ms at the median and 838 ms at p99, while the
disk answers `fsync` in under a millisecond. The same vote appended and `fsync`ed as one line on
the thread that received it took 2.2 / 38.9 ms (bench/RESULTS.md). So a vote on a pair the app
knows (`storage.acknowledged_votes`) is acknowledged once its line is durable; DuckDB gets it
from the store's writer thread a moment later, and on the next open if the app died first.

A line that was cut off by a crash was never acknowledged (the acknowledgement comes after the
`fsync`), so it is skipped. The file is emptied once every line in it is in DuckDB and it has
grown past `TRUNCATE_BYTES`, and at once when a conversation is deleted, so that what a user
deleted does not stay here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.private import private_fd

log = logging.getLogger(__name__)

TRUNCATE_BYTES = 256 * 1024  # emptied once this large and fully applied (~1,300 votes)
COMPACT_BYTES = 4 * 1024 * 1024  # rewritten with only the lines still to apply


@dataclass(frozen=True)
class JournaledVote:
    """What DuckDB needs to store an acknowledged vote exactly as it was answered."""

    vote_id: str
    pair_id: str
    choice: str
    voter: str | None
    session_id: str | None
    client: str | None
    flagged: str | None
    demonstration_id: str | None
    demonstration: str | None
    voted_at: float  # seconds since the epoch, when it was acknowledged


def journal_path(database: Path) -> Path:
    return database.with_name(database.name + ".votes.jsonl")


class VoteJournal:
    """An append-only file of `JournaledVote` lines, numbered from 1 in the order appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()  # `then` may settle a write that ends in `applied_through`
        self._file = open_private(path)
        self._appended = 0  # lines appended since the file was last emptied
        self._first = 1  # number of the file's first line
        # A refused line that could not be cut off again: lines are no longer counted right,
        # so nothing more is appended (the store's votes take the writer's path) or dropped.
        self.broken = False

    def read(self) -> list[JournaledVote]:
        """Every complete line (a torn last line was never acknowledged)."""
        votes = []
        for n, record in enumerate(self.path.read_bytes().split(b"\n")):
            if not record:
                continue
            try:
                votes.append(JournaledVote(**json.loads(record)))
            except (ValueError, TypeError) as exc:
                log.warning("vote journal %s: line %d skipped (%s)", self.path, n + 1, exc)
        return votes

    def append(self, vote: JournaledVote, then: Callable[[int], None] | None = None) -> int:
        """Write and `fsync` the vote's line; returns its number. `then(number)` runs before
        the lock is let go, so that whatever it queues is queued in the journal's order.

        A line that could not be written whole and synced is cut off again (the vote is
        refused, so it must not be stored later); each line starts on a new line of its own,
        so that one cut-off piece left behind can never swallow the next vote."""
        line = b"\n" + json.dumps(asdict(vote), separators=(",", ":")).encode()
        with self._lock:
            fd = self._file.fileno()
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: full
                os.fdatasync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    self.broken = True
                raise
            self._appended += 1
            number = self._first + self._appended - 1
            if then is not None:
                then(number)
            return number

    def applied_through(self, number: int, force: bool = False) -> None:
        """Lines up to `number` are in DuckDB: empty the file when all of it is and it is large,
        or rewrite it with the rest when it is very large; `force`: either, now (a deletion)."""
        with self._lock:
            if self.broken:
                return
            last = self._first + self._appended - 1
            size = os.fstat(self._file.fileno()).st_size
            if number >= last and (force or size >= TRUNCATE_BYTES):
                self._file.truncate(0)
                self._file.seek(0)
                os.fsync(self._file.fileno())
                self._first, self._appended = last + 1, 0
            elif force or size >= COMPACT_BYTES:
                self._compact(keep_after=number)

    def _compact(self, keep_after: int) -> None:
        records = [r for r in self.path.read_bytes().split(b"\n") if _whole(r)]
        last = self._first + self._appended - 1
        keep = records[max(0, len(records) - (last - keep_after)) :] if last > keep_after else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with open_private(tmp) as out:
            out.write(b"".join(b"\n" + r for r in keep))
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself is durable
        finally:
            os.close(folder)
        self._file.close()
        self._file = open_private(self.path)
        self._first, self._appended = keep_after + 1, len(keep)

    def empty(self) -> None:
        """After the lines were stored on open (a replay): start afresh."""
        with self._lock:
            self._file.truncate(0)
            self._file.seek(0)
            os.fsync(self._file.fileno())
            self._first, self._appended = 1, 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


def open_private(path: Path):
    """Unbuffered, appending, readable by the app's user only: the lines name sessions and may
    hold a reply a user wrote."""
    return os.fdopen(private_fd(path, os.O_WRONLY | os.O_APPEND), "ab", buffering=0)


def _whole(record: bytes) -> bool:
    try:
        json.loads(record)
    except ValueError:
        return False
    return True
