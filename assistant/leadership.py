"""Several app processes on one Postgres: which one leads, and how the others keep up with it.

Exactly one process runs what must run once (the retrain scheduler and the cycles, the canary's
decisions, pruning, retention, the critique worker): the holder of a Postgres advisory lock
(`storage.leader_lock`). The others try for it every `LEADER_POLL_S`, so when the leader dies
(its connection closes with it) another takes over within that, plus the time Postgres takes to
see the connection gone (immediate for a killed process on the same network).

Every process that does not lead follows the store every `FOLLOW_POLL_S`: the serving version
(its engines, shared with the leader, are swapped by the leader: it takes the new version as
the serving one without swapping them) and the running canary (its pairs are offered here too;
votes cast here are decided on by the leader's `check`). Cycles asked for here wait for the
leader through the store (`alignment.loop.AlignmentLoop.serve_cycle_requests`).

On DuckDB (one process) the process leads from the start and nothing polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from storage.leader_lock import LeaderLock

log = logging.getLogger(__name__)

LEADER_POLL_S = 5.0  # a process that does not lead tries for the lock this often
FOLLOW_POLL_S = 2.0  # and reads the serving version and the canary this often


class Leadership:
    """`leading` is this process's part; `run_forever` keeps it true (gain, loss, takeover)."""

    def __init__(
        self,
        url: str | None,
        on_gain: Callable[[], Awaitable[None]],
        on_loss: Callable[[], Awaitable[None]],
        follow: Callable[[], Awaitable[None]],
        poll_s: float = LEADER_POLL_S,
        follow_s: float = FOLLOW_POLL_S,
    ) -> None:
        self._lock = LeaderLock(url) if url else None
        self._on_gain, self._on_loss, self._follow = on_gain, on_loss, follow
        self.poll_s, self.follow_s = poll_s, follow_s
        self.leading = self._lock is None  # DuckDB: the one process leads

    @property
    def shared(self) -> bool:
        """Several processes may share the database (Postgres)."""
        return self._lock is not None

    async def try_lead(self) -> bool:
        """One try for the lock (at start, before the engines are prepared: a process that
        does not lead must not swap the engines it shares)."""
        if self._lock is not None and not self.leading:
            self.leading = await asyncio.to_thread(self._lock.try_acquire)
        return self.leading

    async def run_forever(self) -> None:
        if self._lock is None:
            return
        next_try = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.leading:
                    if not await asyncio.to_thread(self._lock.holds):
                        self.leading = False
                        log.error("this app process lost the lead (its database connection)")
                        await self._on_loss()
                elif loop.time() >= next_try:
                    next_try = loop.time() + self.poll_s
                    if await self.try_lead():
                        log.warning("this app process leads now (scheduler, canary, cycles)")
                        await self._on_gain()
                if not self.leading:
                    await self._follow()
            except Exception:  # noqa: BLE001 - the next round tries again (the database is down)
                log.exception("leadership round failed")
            await asyncio.sleep(self.follow_s)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self.leading = False
