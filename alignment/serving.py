"""Which version serves: the one place that changes it.

A deployment, a rollback and a canary's promotion all do the same two things, in this order:
swap the version's weights into the engine, then record it as serving (the one it replaced
becomes 'previous'). Doing it here keeps the engine and the store agreeing on the serving version,
and applies one rule to all three: a version with no weights (rejected, or pruned) never serves.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from storage import Store


class SwappableEngine(Protocol):
    async def reload_weights(self, path: str, version: str) -> float: ...


async def serve_version(store: Store, engine: SwappableEngine, version: str) -> float:
    """Swap `version` in for every user; returns the swap's seconds. Raises ConflictError for a
    version with no weights to serve, before touching the engine."""
    path = await asyncio.to_thread(store.servable_path, version)
    swap = await engine.reload_weights(path, version)
    await asyncio.to_thread(store.set_serving, version, swap)
    return swap
