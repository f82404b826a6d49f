"""How fast a session, a client address and everybody together may vote, how many sessions
one address is issued, and how large a request body may be.

One client must not steer what the model is retrained on. Votes are counted per session (an id the
server issued), per client address (one person can open many sessions) and in total (many
addresses at once), each over the last minute; so are the sessions issued to each address (every
session brings its own vote allowance). Every counter forgets keys idle for a minute and holds at
most `max_keys` of them (least recently used go first), so a stream of new sessions cannot grow
memory.

`BodyLimit` refuses a request body once it passes MAX_BODY_BYTES, for every route of the app (the
JSON API, the admin sign-in and Gradio's queue, call and component routes alike), while it arrives.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass

WINDOW_S = 60.0
MAX_BODY_BYTES = 256 * 1024


class SlidingWindow:
    """Events per key within the last `WINDOW_S` seconds."""

    def __init__(self, limit: int, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._times: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def retry_after(self, key: str, now: float) -> int | None:
        """Seconds until `key` may act again, or None if it may now (nothing recorded)."""
        if not self.limit:
            return None
        times = self._times.get(key)
        if times is None:
            return None
        while times and now - times[0] > WINDOW_S:
            times.popleft()
        if len(times) < self.limit:
            return None
        return int(WINDOW_S - (now - times[0])) + 1

    def record(self, key: str, now: float) -> None:
        if not self.limit:
            return
        times = self._times.pop(key, None) or collections.deque()
        times.append(now)
        self._times[key] = times  # most recently used last
        self._evict(now)

    def _evict(self, now: float) -> None:
        while self._times:
            oldest_key, oldest = next(iter(self._times.items()))
            if len(self._times) <= self.max_keys and oldest and now - oldest[-1] <= WINDOW_S:
                break
            del self._times[oldest_key]

    def __len__(self) -> int:
        return len(self._times)


@dataclass(frozen=True)
class Refusal:
    """Who is over the limit, and for how long, in words a client reads."""

    message: str
    retry_after_s: int


class VoteLimits:
    def __init__(self, per_session: int, per_address: int, total: int) -> None:
        self.windows = {
            "session": SlidingWindow(per_session),
            "address": SlidingWindow(per_address),
            "total": SlidingWindow(total),
        }

    def charge(
        self, session_id: str | None, client: str | None, now: float | None = None
    ) -> Refusal | None:
        """Count one vote against every limit that applies, or refuse it without counting."""
        now = time.monotonic() if now is None else now
        keys = {"session": session_id, "address": client, "total": "all"}
        for kind, key in keys.items():
            if key is None:
                continue
            window = self.windows[kind]
            if (retry := window.retry_after(key, now)) is not None:
                who = {"session": "this session", "address": "this address"}.get(
                    kind, "everybody together"
                )
                return Refusal(
                    f"too many votes from {who}: at most {window.limit} a minute; "
                    f"retry in {retry} s",
                    retry,
                )
        for kind, key in keys.items():
            if key is not None:
                self.windows[kind].record(key, now)
        return None


class SessionLimit:
    """New sessions issued to one client address per minute (the page's cookie and
    `POST /api/session` alike)."""

    def __init__(self, per_address: int) -> None:
        self.window = SlidingWindow(per_address)

    def charge(self, client: str | None, now: float | None = None) -> Refusal | None:
        """Count one new session for `client`, or refuse it without counting."""
        now = time.monotonic() if now is None else now
        if client is None:
            return None
        if (retry := self.window.retry_after(client, now)) is not None:
            return Refusal(
                f"too many new sessions from this address: at most {self.window.limit} a "
                f"minute; retry in {retry} s",
                retry,
            )
        self.window.record(client, now)
        return None


class BodyLimit:
    """ASGI middleware: a request body is read here first, counted as it arrives, and refused
    (413) once it passes `limit` or declares more; the app then reads the same bytes. Raising
    from inside the app instead would meet Gradio's own error handler, which answers 500."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client hung up: nobody to answer
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            if size > self.limit:
                return await self._refuse(scope, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later reads wait for the client to hang up
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        message = f"request body is over {self.limit} bytes"
        # the OpenAI-compatible routes answer in OpenAI's error shape, as their handlers do
        error = (
            {"message": message, "type": "invalid_request_error", "code": 413}
            if scope.get("path", "").startswith("/v1/")
            else message
        )
        answer = json.dumps({"error": error}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})
