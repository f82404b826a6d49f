"""Start retrain cycles by themselves: after N new decisive votes, or T minutes with new votes.

At most one cycle runs at a time (the loop's lock); a failed cycle is logged and the scheduler
carries on. Triggered by hand, the same loop runs through `POST /api/retrain` or the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import time

from alignment.config import LoopConfig
from alignment.sources import source_refusal

log = logging.getLogger(__name__)


def cycle_due(new_votes: int, minutes_since_last: float | None, config: LoopConfig) -> bool:
    if new_votes == 0:
        return False
    if config.every_votes and new_votes >= config.every_votes:
        return True
    if config.every_minutes and minutes_since_last is not None:
        return minutes_since_last >= config.every_minutes
    return False


class RetrainScheduler:
    def __init__(self, loop, store, config: LoopConfig, max_source_share: float = 1.0) -> None:
        self.loop = loop
        self.store = store
        self.config = config
        self.max_source_share = max_source_share
        self.started = time.time()
        self._until_next: tuple[float, int | None] = (0.0, None)  # (when read, votes to go)

    async def votes_until_next(self, max_age_s: float = 10.0) -> int | None:
        """Decisive votes still needed before the scheduler starts a cycle by itself (None: it
        does not count votes); read at most every `max_age_s`, however many pages ask."""
        if not self.config.every_votes:
            return None
        read_at, value = self._until_next
        if time.monotonic() - read_at > max_age_s:
            new, _ = await asyncio.to_thread(self.store.new_decisive_votes)
            value = max(0, self.config.every_votes - new)
            self._until_next = (time.monotonic(), value)
        return value

    async def run_forever(self) -> None:
        if not (self.config.every_votes or self.config.every_minutes):
            return
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            if self.loop.running or (self.loop.canary is not None and self.loop.canary.running):
                continue  # one cycle at a time, and none while users judge the last version
            new, minutes = await asyncio.to_thread(self.store.new_decisive_votes)
            if minutes is None:  # never trained: count the time since the app started
                minutes = (time.time() - self.started) / 60
            if not cycle_due(new, minutes, self.config):
                continue
            sources = await asyncio.to_thread(self.store.new_vote_sources)
            if (reason := source_refusal(sources, self.max_source_share)) is not None:
                log.warning("scheduled cycle refused: %s", reason)
                await asyncio.to_thread(self.store.refuse_cycle, reason, {"vote_sources": sources})
                continue
            try:
                summary = await self.loop.retrain()
                log.warning("scheduled cycle: %s %s", summary.get("status"), summary.get("version"))
            except Exception:  # noqa: BLE001 - a failed cycle must not stop the scheduler
                log.exception("scheduled retrain cycle failed")
