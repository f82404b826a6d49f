"""The one base of every error a caller may be told about, in every layer.

Storage, the chat service, the engine client and the sessions raise subclasses; each carries the
HTTP status the edge answers with, the message a caller may read, and when a retry can work.
The API maps them in one exception handler, the page shows `public()`, the CLI prints it; none
of them enumerates the classes. It lives in the bottom package so that every layer can import it
(storage imports nothing above itself); the status is a number, not an HTTP answer.
"""

from __future__ import annotations

from pathlib import Path


class AppError(Exception):
    status: int = 500
    retry_after_s: int | None = None
    # What a caller without server access may read; None: the message itself. Subclasses whose
    # message names server things (paths, the engine's URL) set it and `log_detail`.
    public_message: str | None = None
    log_detail: bool = False

    def public(self) -> str:
        return self.public_message or str(self)


class InvalidInputError(AppError, ValueError):
    """The request is malformed; the message says what is wrong (HTTP 400/413/422). Here, in
    the bottom package, so storage's own checks (a vote's choice, an export's format) and the
    services' raise the same error."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StoreError(AppError):
    """The database could not be opened or written; the message says why and what to do."""

    status = 503


class DatabaseInUseError(StoreError):
    """Another process (the running app) holds the database; ask that process instead."""

    status = 409


class WriteConflictError(StoreError):
    """Another request wrote the same rows at the same moment, and retrying did not get
    through; nothing of this request was saved and it may simply be sent again."""

    retry_after_s = 1

    def __init__(self, detail: str) -> None:
        super().__init__(f"the database was busy with a conflicting write ({detail[:200]})")
        self.public_message = "the server was busy saving another request; try again"


class DatabaseUnavailableError(StoreError):
    """The database server (Postgres) is down or unreachable: nothing of this request was
    saved; the app reconnects by itself once it is back."""

    retry_after_s = 5

    def __init__(self, where: str, detail: str) -> None:
        first = detail.splitlines()[0][:200] if detail else "no answer"
        super().__init__(
            f"the database at {where} is not reachable ({first}); the app reconnects once it "
            "is back"
        )
        self.public_message = "the server's database is not reachable right now; try again"


class StorageWriteError(StoreError):
    """A write could not reach the disk (full, read-only, I/O error). DuckDB rolls the whole
    transaction back, so nothing of it is kept and what was committed before stays intact;
    the write succeeds again once the cause is fixed, without a restart."""

    def __init__(self, path: Path | str, detail: str) -> None:
        self.disk_full = "no space left" in detail.lower()
        self.read_only = "read-only" in detail.lower()
        cause = (
            "the disk is full"
            if self.disk_full
            else "the file system is read-only"
            if self.read_only
            else "an I/O error"
        )
        super().__init__(
            f"nothing was saved: the database {path} could not be written ({cause}: "
            f"{detail.splitlines()[0][:200]}). Free space or fix the data directory and retry."
        )
        # 507 Insufficient Storage says "full" precisely; other write failures are a 503.
        self.status = 507 if self.disk_full else 503
        self.retry_after_s = 30
        self.log_detail = True
        # What an unauthenticated caller may read: no server path, no driver text (the log
        # has those).
        self.public_message = (
            f"nothing was saved: the server could not write its database ({cause}). "
            "Try again later."
        )


class NotFoundError(AppError, KeyError):
    """An id that the caller sent does not exist."""

    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class ForbiddenError(AppError):
    """The id exists but belongs to another session's conversation."""

    status = 403


class ConflictError(AppError):
    """The request contradicts stored state (a second vote on a pair, say)."""

    status = 409
