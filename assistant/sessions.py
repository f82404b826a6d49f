"""Sessions the server issues, and the pseudonymous tag of a client's address.

A session id is `issued.nonce.tag`: when it was issued (seconds since the epoch), a random nonce,
and an HMAC of both under a key only the server holds. The server needs no session table, and a
client can neither make one up, take someone else's by guessing, nor stretch one past its
lifetime (`--session-days`, then it is refused as expired). A conversation belongs to the session
that started it; votes are limited per session. The page gets its id in an HttpOnly cookie, so a
script on the page cannot read it (an expired or unknown cookie is silently replaced); API clients
ask `POST /api/session` and send it back as `X-Session-Id` (an expired or unknown one: 403).

An id is a bearer token, so the service and the database never see it: `check` and `owner` hand
on its hash (`storage.rules.session_hash`), which is what conversations, votes and the vote
journal record.

The key lives in the data directory (mode 0600), so sessions outlive a restart; on Postgres it
lives in the database (`SessionKeys.shared`), so that every app process behind one load balancer
accepts the sessions any of them issued. The same key tags client addresses: the votes table
records which client a vote came from (to see one client steering a cycle) without keeping
anyone's IP address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from storage.errors import AppError
from storage.rules import session_hash
from storage.shared_records import SharedRecords

SESSION_COOKIE = "assistant_session"
SESSION_HEADER = "x-session-id"
MAX_SESSION_CHARS = 64  # an issued id is 52; anything longer is refused before any lookup
_TAG_BYTES = 12
CLOCK_SKEW_S = 300  # an id "issued" this far in the future still counts (the clock was set back)


class UnknownSessionError(AppError, ValueError):
    """A session id this server did not issue (HTTP 403)."""

    status = 403


class SessionKeys:
    def __init__(self, key: bytes, session_days: float = 30.0) -> None:
        self._key = key
        self._max_age_s = session_days * 86_400

    @classmethod
    def load_or_create(cls, path: Path, session_days: float = 30.0) -> SessionKeys:
        """The key file, created private on first start."""
        try:
            return cls(path.read_bytes(), session_days)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            return cls(key, session_days)

    @classmethod
    def shared(cls, store: SharedRecords, session_days: float = 30.0) -> SessionKeys:
        """The key every app process on the store's (Postgres) database shares, created there
        on the first start: a session issued by one process is valid on all of them, and so
        is a client's tag."""
        key = store.shared_key("session", lambda: secrets.token_bytes(32).hex())
        return cls(bytes.fromhex(key), session_days)

    def sign(self, purpose: bytes, value: str) -> str:
        """A keyed tag of `value` for one purpose (sessions, client tags, the admin cookie)."""
        return self._tag(purpose, value)

    def _tag(self, purpose: bytes, value: str) -> str:
        mac = hmac.new(self._key, purpose + value.encode(), hashlib.sha256).digest()
        return mac[:_TAG_BYTES].hex()

    def issue(self, now: float | None = None) -> str:
        issued = f"{int(time.time() if now is None else now)}.{secrets.token_urlsafe(12)}"
        return f"{issued}.{self._tag(b'session:', issued)}"

    def problem(self, session_id: object, now: float | None = None) -> str | None:
        """None when `session_id` is a live id issued here; else "unknown" or "expired"."""
        # An issued id is ASCII. Anything else (a cookie may carry any Latin-1 byte, a JSON body
        # a lone surrogate) is refused here: `hmac.compare_digest` raises on non-ASCII text.
        if (
            not isinstance(session_id, str)
            or len(session_id) > MAX_SESSION_CHARS
            or not session_id.isascii()
        ):
            return "unknown"
        signed, _, tag = session_id.rpartition(".")
        issued, _, nonce = signed.partition(".")
        if not (issued.isdigit() and nonce) or not hmac.compare_digest(
            tag, self._tag(b"session:", signed)
        ):
            return "unknown"
        age = (time.time() if now is None else now) - int(issued)
        return None if -CLOCK_SKEW_S <= age <= self._max_age_s else "expired"

    def is_valid(self, session_id: object, now: float | None = None) -> bool:
        return self.problem(session_id, now) is None

    def owner(self, cookie: object) -> str | None:
        """What the service and the store know a live session by (its hash); None for no
        session or one that is not live (the page's stale cookie is replaced, not refused)."""
        return session_hash(cookie) if self.is_valid(cookie) else None  # type: ignore[arg-type]

    def check(self, session_id: object) -> str | None:
        """`owner` of an id a client sent explicitly: None if absent; UnknownSessionError (403)
        if it was not issued here or has expired."""
        if session_id is None or session_id == "":
            return None
        problem = self.problem(session_id)
        if problem == "expired":
            raise UnknownSessionError(
                f"expired session id (sessions last {self._max_age_s / 86_400:g} days): ask "
                "POST /api/session for a new one"
            )
        if problem is not None:
            raise UnknownSessionError(
                "unknown session id: ask POST /api/session for one (the page gets one by itself)"
            )
        return session_hash(session_id)  # type: ignore[arg-type]

    def client_tag(self, address: str | None) -> str | None:
        """A stable pseudonym of a client address: enough to count votes per client, not
        enough to recover the address."""
        return None if not address else "c-" + self._tag(b"client:", address)
