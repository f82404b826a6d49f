"""What the page needs from the layers below it, as protocols: the `ui` package imports nothing
from `assistant` (the app assembles the page and hands it these), so no import runs upward and
the top-level packages have no cycle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from storage.store import RecordedVote


class ChatService(Protocol):
    """`assistant.chat_service.ChatService`, as far as the page uses it."""

    model_version: str
    engine_note: str | None

    def stream_turn(
        self,
        conversation_id: str | None,
        message: object,
        *,
        session_id: str | None = None,
        client: str | None = None,
    ) -> AsyncIterator[Any]: ...

    async def vote(
        self,
        pair_id: object,
        choice: object,
        *,
        voter: str | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> RecordedVote: ...

    async def demonstrate(
        self,
        pair_id: object,
        text: object,
        *,
        session_id: str | None = None,
        client: str | None = None,
    ) -> RecordedVote: ...

    async def delete_conversation(self, conversation_id: str, session_id: str | None) -> dict: ...

    async def health(self, admin: bool = False) -> dict: ...


class PageAuth(Protocol):
    """`assistant.page_auth.PageAuth`: who is looking, from the request's cookies."""

    def visitor(self, request) -> dict[str, str | None]: ...

    def admin_problem(self, request) -> str | None: ...


class Canary(Protocol):
    """`assistant.canary_service.CanaryService`, as far as the page's lines use it."""

    running: bool

    async def status(self) -> dict[str, Any]: ...
