"""How fast a session, a client address and everybody together may vote, and how many sessions
one address is issued.

One client must not steer what the model is retrained on. Votes are counted per session (an id the
server issued), per client address (one person can open many sessions) and in total (many
addresses at once), each over the last minute; so are the sessions issued to each address (every
session brings its own vote allowance). Every counter forgets keys idle for a minute and holds at
most `max_keys` of them (least recently used go first), so a stream of new sessions cannot grow
memory.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

WINDOW_S = 60.0


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
