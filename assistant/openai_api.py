"""`GET /v1/models` and `POST /v1/chat/completions`: the aligned model for other tools.

Open WebUI, LangChain or a plain OpenAI client can use the version the users trained: requests are
answered by the serving version (streaming too), one reply each, not logged as pairs, prompted as
the page's turns are (the default prompt variant, `--system-prompt`). While a canary runs, the
challenger is listed too (`aligned-assistant-challenger`), so Open WebUI's arena can compare
them. The route has its own key (`ASSISTANT_OPENAI_API_KEY`; off without it), takes places in the
backlog like a chat turn, and answers errors in OpenAI's shape `{"error": {"message", "type",
"code"}}`.
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

MODEL_ID = "aligned-assistant"  # the serving version (any other model name means it too)
CHALLENGER_ID = "aligned-assistant-challenger"  # the running canary's challenger, while it runs


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
        # the serving version, and while a canary runs its challenger: Open WebUI's arena (or
        # any client) can then put the two side by side
        models = [(MODEL_ID, service.model_version)]
        if (challenger := service.challenger_version) is not None:
            models.append((CHALLENGER_ID, challenger))
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": now,
                    "owned_by": "aligned-assistant",
                    "version": version,
                }
                for model_id, version in models
            ],
        }

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        client = sessions.client_tag(request.client.host if request.client else None)
        try:
            body = await read_json(request)
            chunks = service.openai_chat(
                body, client=client, challenger=body.get("model") == CHALLENGER_ID
            )
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
