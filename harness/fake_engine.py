"""An `Engine` with no model behind it, for tests of the app's edge that need no real replies.

The API's rules (statuses, limits, sessions, what is stored) do not depend on what the model
says, so `build_app(config, runtime)` given this engine answers them in-process, in milliseconds,
without starting vLLM. Replies are short, deterministic texts named after their seed and
version (`"reply 7 from v0000"`), so a test can still tell the two candidates and the versions
apart. The real engine's behaviour is tested against vLLM itself (tests/test_engine.py) and end
to end through `assistant run`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from engine.protocol import CandidateDraft, Challenger, PairProgress


class FakeEngine:
    base_url = "http://fake-engine"

    def __init__(self, version: str = "v0000") -> None:
        self._version = version
        self.adapters: set[str] = set()
        self.reloads: list[tuple[str, str]] = []  # (path, version) of each swap
        self.up = True
        self.forwarded: list[dict] = []  # what the OpenAI-compatible route passed on
        # Replies wait while `hold` is an Event not yet set: a test fills the backlog with them
        # and sets it (`client.portal.call(engine.hold.set)`); `held` counts those waiting.
        self.hold: asyncio.Event | None = None
        self.held = 0

    @property
    def model_version(self) -> str:
        return self._version

    async def healthy(self) -> bool:
        return self.up

    async def prepare(self) -> None:
        pass

    async def watch_forever(self) -> None:
        pass  # nothing to watch: one engine in this process

    async def watch_once(self) -> None:
        pass

    def statuses(self) -> list:
        return []

    async def stream_pair(
        self,
        messages: list[dict[str, str]],
        sampling: dict,
        seed: int,
        challenger: Challenger | None = None,
        per_candidate=None,
    ) -> AsyncIterator[PairProgress]:
        if self.hold is not None:
            self.held += 1
            try:
                await self.hold.wait()
            finally:
                self.held -= 1
        drafts = (
            CandidateDraft(0, seed, model_version=self._version),
            CandidateDraft(1, seed + 1, model_version=self._version),
        )
        if challenger is not None and challenger.version in self.adapters:
            drafts[challenger.slot].model_version = challenger.version
        for d in drafts:
            d.text = f"reply {d.seed} from {d.model_version}"
            d.completion_tokens = 4
            d.finish_reason = "stop"
            d.latency_ms = 1.0
        yield PairProgress(drafts, self._version, 8, final=True, sampling=sampling)

    def follow(self, version: str, path: str | None) -> None:
        self._version = version  # one fake engine per app: it "serves" what the leader deployed

    async def load_adapter(self, name: str, path: str) -> None:
        self.adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.adapters.discard(name)

    async def reload_weights(
        self, path: str, version: str, commit: Callable[[float], Awaitable[None]] | None = None
    ) -> float:
        self._version = version
        self.reloads.append((path, version))
        if commit is not None:
            await commit(0.0)
        return 0.0

    async def complete(self, messages: list[dict[str, str]], sampling: dict, seed: int) -> str:
        return f"a revision ({seed})"

    async def option_probabilities(
        self, messages: list[dict[str, str]], options: tuple[str, ...]
    ) -> dict[str, float]:
        return dict.fromkeys(options, 1.0 / len(options))

    async def forward_chat(self, body: dict, challenger: str | None = None) -> AsyncIterator[bytes]:
        version = challenger if challenger in self.adapters else self._version
        self.forwarded.append({**body, "answered_by": version})
        yield json.dumps(
            {
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"hi from {version}"}}
                ],
            }
        ).encode()

    async def metrics(self) -> str:
        return "# TYPE fake_engine_up gauge\nfake_engine_up 1\n"

    async def aclose(self) -> None:
        pass
