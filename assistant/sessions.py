"""Sessions the server issues, and the pseudonymous tag of a client's address.

A session id is `nonce.tag`, the tag an HMAC of the nonce under a key only the server holds: the
server needs no session table, and a client cannot make one up or take someone else's by guessing
(a conversation belongs to the session that started it; votes are limited per session). The page
gets its id in an HttpOnly cookie, so a script on the page cannot read it; API clients ask
`POST /api/session` and send it back as `X-Session-Id`.

The key lives in the data directory (mode 0600), so sessions outlive a restart. The same key tags
client addresses: the votes table records which client a vote came from (to see one client
steering a cycle) without keeping anyone's IP address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from storage.errors import AppError

SESSION_COOKIE = "assistant_session"
SESSION_HEADER = "x-session-id"
MAX_SESSION_CHARS = 64  # an issued id is 40; anything longer is refused before any lookup
_TAG_BYTES = 12


class UnknownSessionError(AppError, ValueError):
    """A session id this server did not issue (HTTP 403)."""

    status = 403


class SessionKeys:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def load_or_create(cls, path: Path) -> SessionKeys:
        """The key file, created private on first start."""
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            return cls(key)

    def sign(self, purpose: bytes, value: str) -> str:
        """A keyed tag of `value` for one purpose (sessions, client tags, the admin cookie)."""
        return self._tag(purpose, value)

    def _tag(self, purpose: bytes, value: str) -> str:
        mac = hmac.new(self._key, purpose + value.encode(), hashlib.sha256).digest()
        return mac[:_TAG_BYTES].hex()

    def issue(self) -> str:
        nonce = secrets.token_urlsafe(12)
        return f"{nonce}.{self._tag(b'session:', nonce)}"

    def is_valid(self, session_id: object) -> bool:
        # An issued id is ASCII. Anything else (a cookie may carry any Latin-1 byte, a JSON body
        # a lone surrogate) is refused here: `hmac.compare_digest` raises on non-ASCII text.
        if (
            not isinstance(session_id, str)
            or len(session_id) > MAX_SESSION_CHARS
            or not session_id.isascii()
        ):
            return False
        nonce, _, tag = session_id.partition(".")
        return bool(nonce) and hmac.compare_digest(tag, self._tag(b"session:", nonce))

    def check(self, session_id: object) -> str | None:
        """The id if issued here; None if absent; UnknownSessionError otherwise."""
        if session_id is None or session_id == "":
            return None
        if not self.is_valid(session_id):
            raise UnknownSessionError(
                "unknown session id: ask POST /api/session for one (the page gets one by itself)"
            )
        return session_id  # type: ignore[return-value]

    def client_tag(self, address: str | None) -> str | None:
        """A stable pseudonym of a client address: enough to count votes per client, not
        enough to recover the address."""
        return None if not address else "c-" + self._tag(b"client:", address)
