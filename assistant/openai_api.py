"""`GET /v1/models` and `POST /v1/chat/completions`: the aligned model for other tools.

Open WebUI, LangChain or a plain OpenAI client can use the version the users trained: requests are
answered by the serving version (streaming too), one reply each, not logged as pairs. The route
has its own key (`ASSISTANT_OPENAI_API_KEY`; off without it), takes places in the backlog like a
chat turn, and answers errors in OpenAI's shape `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from assistant.admin import openai_key_error
from assistant.api import error_parts, read_json
from assistant.chat_service import ChatService
from assistant.sessions import SessionKeys
from storage import AppError

MODEL_ID = "aligned-assistant"


def openai_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}},
        status_code=status,
        headers=headers,
    )


def build_openai_router(service: ChatService, sessions: SessionKeys) -> APIRouter:
    router = APIRouter(prefix="/v1")

    def refusal(request: Request) -> JSONResponse | None:
        problem = openai_key_error(request.headers.get("authorization"))
        return None if problem is None else openai_error(*problem)

    @router.get("/models")
    async def models(request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        return {
            "object": "list",
            "data": [
                {
                    "id": MODEL_ID,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "aligned-assistant",
                    "version": service.model_version,
                }
            ],
        }

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        client = sessions.client_tag(request.client.host if request.client else None)
        try:
            body = await read_json(request)
            chunks = service.openai_chat(body, client=client)
            # the first chunk settles the status: admission, validation and the engine's own
            # refusals all happen before it
            first = await anext(chunks, b"")
        except AppError as exc:
            return openai_error(*error_parts(exc))

        async def rest() -> AsyncIterator[bytes]:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()  # a client that hangs up gives its backlog place back

        stream = bool(body.get("stream"))
        return StreamingResponse(
            rest(), media_type="text/event-stream" if stream else "application/json"
        )

    return router
