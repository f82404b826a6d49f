"""The engine interface the chat service depends on, and the plain data it returns.

The service never sees vLLM: it asks an `Engine` for a pair of candidates (streamed), the serving
weight version, and later a weight reload. `engine.vllm_client.VLLMServerEngine` is the one
real implementation (embedded or external vLLM server alike); tests may bring fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from storage.errors import AppError


class EngineError(AppError):
    """The engine failed or is unreachable. The message is for the operator's log (it can name
    the engine's URL); `public_message` is what a user or an API client is told."""

    status = 502
    public_message = "the model engine did not answer; try again in a minute"
    log_detail = True


class PromptTooLongError(EngineError):
    """The conversation plus the reply budget does not fit the model's context window."""

    status = 413
    public_message = "the conversation no longer fits the model's context window: start a new chat"
    log_detail = False


class WeightsLoadError(EngineError):
    """The engine answered the swap's pause but its reload of the new weights failed: an error,
    or a connection that broke while it loaded them (vLLM 0.32 on a truncated checkpoint). Told
    apart from an engine that was down before it was given anything, because weights that failed
    on one engine must be given to no other."""


class EngineRequestError(EngineError):
    """The engine refused a request passed through to it as malformed (HTTP 4xx); the message
    is about the request, so the client is told it with the same status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.public_message = message
        self.log_detail = False


@dataclass
class CandidateDraft:
    """One candidate as it grows during streaming."""

    index: int  # 0 -> 'a', 1 -> 'b'
    seed: int
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency_ms: float | None = None  # from request start to this candidate's last token
    model_version: str | None = None  # the version that wrote it (a canary pair has two)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Challenger:
    """A canary pair's second version: the candidate in `slot` (0 = A, 1 = B) comes from the
    challenger, loaded in the engine as a LoRA adapter named `version`."""

    version: str
    slot: int


@dataclass
class PairProgress:
    """A snapshot of both candidates; `final` is set on the last one of a request."""

    candidates: tuple[CandidateDraft, CandidateDraft]
    model_version: str
    prompt_tokens: int | None = None
    final: bool = False
    sampling: dict = field(default_factory=dict)


class Engine(Protocol):
    """What the chat service needs from a policy server."""

    @property
    def model_version(self) -> str:
        """The weight version that answers new requests."""
        ...

    @property
    def base_url(self) -> str:
        """Where the alignment worker sends its rollouts (the same serving engine)."""
        ...

    def stream_pair(
        self,
        messages: list[dict[str, str]],
        sampling: dict,
        seed: int,
        challenger: Challenger | None = None,
        per_candidate: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None,
    ) -> AsyncIterator[PairProgress]:
        """Two candidates for the same prompt, seeds `seed` and `seed+1`: both from the serving
        version, or (a canary pair) one of them from the `challenger`. `per_candidate` (a
        prompt-variant pair): each candidate's own messages instead of `messages`."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Make a LoRA adapter on the serving weights answerable under `name` (a challenger)."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    async def healthy(self) -> bool: ...

    async def prepare(self) -> None:
        """Before the first request: make what serves the serving version (raises EngineError
        when nothing can)."""
        ...

    async def watch_forever(self) -> None:
        """Runs for the app's life: keeps what serves on the serving version."""
        ...

    async def watch_once(self) -> None:
        """One round of `watch_forever`, now (after an engine restart)."""
        ...

    def statuses(self) -> list:
        """The servers behind this engine, as `/api/health` lists them."""
        ...

    def forward_chat(self, body: dict, challenger: str | None = None) -> AsyncIterator[bytes]:
        """An OpenAI chat-completions request passed through (to `challenger`'s adapter while it
        is loaded), its answer's bytes as they come."""
        ...

    async def reload_weights(
        self, path: str, version: str, commit: Callable[[float], Awaitable[None]] | None = None
    ) -> float:
        """Swap the serving weights in place; returns seconds taken. `commit(seconds)` runs
        before any new pair starts on the new weights (the swap and its record are one step)."""
        ...

    async def metrics(self) -> str:
        """The engine's own metrics in Prometheus' text format."""
        ...

    async def aclose(self) -> None: ...
