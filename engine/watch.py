"""Restart the embedded engine if its process dies, and say so meanwhile.

The watcher polls the engine process; when it has exited it marks the chat service as restarting
(new turns get 503 "the engine is restarting" with Retry-After, health reports it, the page shows
it), starts the engine again on the same port with the weights of the serving version, and clears
the mark once it answers. An external engine (`--vllm-url`) is not ours to restart.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class EngineWatch:
    def __init__(self, embedded, service, store, poll_s: float = 2.0, after_restart=None) -> None:
        self.after_restart = after_restart  # e.g. reload a running canary's adapter
        self.embedded = embedded
        self.service = service
        self.store = store
        self.poll_s = poll_s
        self.restarts = 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.embedded.alive():
                continue
            log.error("the engine process exited; restarting it")
            self.service.engine_note = "the engine stopped and is restarting"
            try:
                serving = await asyncio.to_thread(self.store.serving_version)
                if serving and serving.get("path"):
                    self.embedded.model_path = serving["path"]
                self.embedded.start()
                await asyncio.to_thread(self.embedded.wait_ready)
                self.restarts += 1
                if self.after_restart is not None:
                    await self.after_restart()
                self.service.engine_note = None
            except Exception:  # noqa: BLE001 - keep trying; the note stays up meanwhile
                log.exception("engine restart failed; trying again")
