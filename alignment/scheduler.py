"""Start retrain cycles by themselves: after N new decisive votes, or T minutes with new votes.

At most one cycle runs at a time (the loop's lock); a failed cycle is logged and the scheduler
carries on. Triggered by hand, the same loop runs through `POST /api/retrain` or the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import time

from alignment.config import LoopConfig

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
    def __init__(self, loop, store, config: LoopConfig) -> None:
        self.loop = loop
        self.store = store
        self.config = config
        self.started = time.time()

    async def run_forever(self) -> None:
        if not (self.config.every_votes or self.config.every_minutes):
            return
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            if self.loop.running:
                continue
            new, minutes = await asyncio.to_thread(self.store.new_decisive_votes)
            if minutes is None:  # never trained: count the time since the app started
                minutes = (time.time() - self.started) / 60
            if not cycle_due(new, minutes, self.config):
                continue
            try:
                summary = await self.loop.retrain()
                log.warning("scheduled cycle: %s %s", summary.get("status"), summary.get("version"))
            except Exception:  # noqa: BLE001 - a failed cycle must not stop the scheduler
                log.exception("scheduled retrain cycle failed")
