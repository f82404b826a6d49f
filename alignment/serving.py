"""Which version serves: the one place that changes it.

A deployment, a rollback and a canary's promotion all do the same two things, as one step:
swap the version's weights into the engine and record it as serving (the one it replaced
becomes 'previous'; a promoted canary is closed in the same transaction). The record is written
while the engine still holds new pairs back, so no reply labelled with the new version exists
before the store (and `/api/versions`, `/api/canary`) say it serves. Doing it here applies one
rule to all three: a version with no weights (rejected, or pruned) never serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from storage import Store
from storage.canaries import CanaryEnd


class SwappableEngine(Protocol):
    async def reload_weights(
        self, path: str, version: str, commit: Callable[[float], Awaitable[None]] | None = None
    ) -> float: ...


async def serve_version(
    store: Store,
    engine: SwappableEngine,
    version: str,
    ending: CanaryEnd | None = None,
    then: Callable[[], None] | None = None,
) -> float:
    """Swap `version` in for every user; returns the swap's seconds. Raises ConflictError for a
    version with no weights to serve, before touching the engine. `ending` closes a promoted
    canary with the record; `then` (no I/O) runs right after it, before any new pair starts."""
    path = await asyncio.to_thread(store.servable_path, version)

    async def commit(seconds: float) -> None:
        await asyncio.to_thread(store.set_serving, version, seconds, ending)
        if then is not None:
            then()

    return await engine.reload_weights(path, version, commit)
