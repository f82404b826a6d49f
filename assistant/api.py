"""The JSON API: HTTP in, chat service call, HTTP out. No logic lives here.

Routes (documented in docs/api.md):
  POST /api/session  -> {"session_id"}  (send it back as X-Session-Id; the page has a cookie)
  POST /api/chat     {"conversation_id"?, "message"} -> pair of candidates
  POST /api/vote     {"pair_id", "choice": "a"|"b"|"tie"|"both_bad"}
  POST /api/demonstration {"pair_id", "text"}: both were bad; this reply continues instead
  GET  /api/health
  GET  /api/versions -> {"serving", "versions": [...]}  (server paths only with the token)
  GET  /api/export?format=trl|hh|kto|arena|sft -> JSON lines, streamed  (admin token)
  DELETE /api/conversations/{id}  (from the session that started it)
  POST /api/retrain -> 202 {"run_id", "status": "running"} (?wait=true: the summary, at the end)
  GET  /api/retrain/{run_id} -> status, progress, result; GET /api/retrain/{run_id}/events: SSE
  POST /api/retrain/{run_id}/cancel -> stops a cycle while it trains
  POST /api/rollback {"version"}, POST /api/prune {"keep"}  (these four: admin token)
  GET  /api/canary; POST /api/canary/promote, POST /api/canary/retire  (admin token)
  GET  /api/constitution, PUT /api/constitution (admin), GET /api/critiques/{id} (admin)
  GET  /api/prompt-variants; PUT /api/prompt-variants, POST /api/prompt-variants/default (admin)
  GET  /api/openapi.json -> the schema (request and answer models: assistant/protocol.py)

The edge's own rules: a session id must be one the server issued (`assistant.sessions`), the
client's address becomes a keyed tag before it reaches the service. A body over
`assistant.limits.MAX_BODY_BYTES` never gets here: `assistant.limits.BodyLimit` refuses it, for
every route of the app, while it arrives.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from assistant.admin import admin_error
from assistant.chat_service import ChatService
from assistant.protocol import (
    ERRORS,
    CanaryAnswer,
    ChatAnswer,
    ChatRequest,
    ConstitutionAnswer,
    ConstitutionEditedAnswer,
    CritiquesAnswer,
    DefaultVariantRequest,
    DeletedAnswer,
    DemonstrationAnswer,
    DemonstrationRequest,
    HealthAnswer,
    PruneAnswer,
    PruneRequest,
    RetrainAnswer,
    RetrainRun,
    RetrainStarted,
    RollbackAnswer,
    RollbackRequest,
    SessionAnswer,
    VariantsAnswer,
    VersionsAnswer,
    VoteAnswer,
    VoteRequest,
    body_schema,
    parse,
)
from assistant.sessions import SESSION_COOKIE, SESSION_HEADER, SessionKeys
from storage import AppError, InvalidInputError
from storage.export import FORMATS
from storage.rules import unstorable_in

MAX_JSON_DEPTH = 32  # the deepest a body may nest: ours nest 3, OpenAI's messages 5
log = logging.getLogger(__name__)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_parts(exc: AppError) -> tuple[int, str, dict | None]:
    """The one place where the layers' errors become HTTP answers: the status and public
    message each error carries, Retry-After when a retry can work. Detail that names server
    things (paths, the engine's URL) goes to the log only. (The OpenAI-compatible route wraps
    the same parts in OpenAI's error shape.)"""
    if exc.log_detail:
        log.warning("%s: %s", type(exc).__name__, exc)
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return exc.status, exc.public(), headers


def error_response(exc: AppError) -> JSONResponse:
    return error(*error_parts(exc))


def install_error_handler(app) -> None:
    """Routes raise; this answers (as vLLM's router does with its exception handlers)."""

    async def handle(_request: Request, exc: AppError) -> JSONResponse:
        return error_response(exc)

    app.add_exception_handler(AppError, handle)


async def read_json(request: Request) -> dict:
    """The body as a JSON object (its size was checked as it arrived: `limits.BodyLimit`)."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError:  # '[[[[...' deeper than the parser goes
        raise InvalidInputError(
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    if not isinstance(data, dict):
        raise InvalidInputError("request body must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise InvalidInputError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    # JSON may carry what is no text at all ("\ud800", half a surrogate pair): refused here,
    # naming the field, so that nothing is acknowledged that the writer could never store
    # (NUL is text: each field's own rules refuse it where it would be stored)
    if (problem := unstorable_in(data, nul_ok=True)) is not None:
        raise InvalidInputError(problem, 422)
    return data


def _depth(value: object, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply `value` nests (counting stops just past `limit`)."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def _admin_problem(request: Request):
    header = request.headers.get("authorization", "")
    return admin_error(header[len("Bearer ") :] if header.startswith("Bearer ") else None)


def require_admin(request: Request) -> None:
    """Raises the 401/403 (an AppError: the one handler answers) unless the request carries
    the admin token."""
    if (problem := _admin_problem(request)) is not None:
        raise problem


ADMIN_BEARER = HTTPBearer(
    auto_error=False,  # our own 401/403 with the API's error shape (`require_admin`)
    scheme_name="admin token",
    description="the admin token: ASSISTANT_ADMIN_TOKEN, or DATA_DIR/secrets/admin-token",
)


async def admin_only(
    request: Request,
    _sent: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)],
) -> None:
    """The admin routes' dependency (the credentials are read by `require_admin` itself)."""
    require_admin(request)


def is_admin(request: Request) -> bool:
    return _admin_problem(request) is None


def build_api_router(
    service: ChatService, sessions: SessionKeys, loop=None, cai=None, canary=None, variants=None
) -> APIRouter:
    router = APIRouter(prefix="/api")
    # the admin routes: the token is checked before the handler reads anything, and the OpenAPI
    # schema declares the bearer scheme they need
    admin = APIRouter(dependencies=[Security(admin_only)])  # included in `router`: its prefix

    def session(request: Request, sent: str | None) -> str | None:
        """The session's hash, what the service knows it by. An id sent explicitly (in the body
        or the header) must be a live one this server issued (403 otherwise); a stale cookie is
        only ignored (the page gets a new one)."""
        explicit = sent or request.headers.get(SESSION_HEADER)
        if explicit is not None:
            return sessions.check(explicit)
        return sessions.owner(request.cookies.get(SESSION_COOKIE))

    def client(request: Request) -> str | None:
        return sessions.client_tag(request.client.host if request.client else None)

    @router.post(
        "/session",
        response_model=SessionAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def new_session(request: Request):
        service.admit_session(client(request))
        session_id = sessions.issue()
        answer = JSONResponse({"session_id": session_id})
        set_session_cookie(answer, session_id)
        return answer

    @router.post(
        "/chat",
        response_model=ChatAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
        openapi_extra=body_schema(ChatRequest),
    )
    async def chat(request: Request):
        data = await read_json(request)
        body = parse(ChatRequest, data)
        result = await service.chat(
            body.conversation_id,
            body.message,
            session_id=session(request, body.session_id),
            client=client(request),
        )
        return result.as_json()

    @router.post(
        "/vote",
        response_model=VoteAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
        openapi_extra=body_schema(VoteRequest),
    )
    async def vote(request: Request):
        data = parse(VoteRequest, await read_json(request))
        started = time.perf_counter()
        body = await service.vote(
            data.pair_id,
            data.choice,
            voter=data.voter,
            session_id=session(request, data.session_id),
            client=client(request),
        )
        # How long saving the vote took (queueing for the single writer included), in the
        # standard Server-Timing header, so clients and the load benchmark can see write latency.
        ms = (time.perf_counter() - started) * 1000
        return JSONResponse(body.as_dict(), headers={"Server-Timing": f"db;dur={ms:.2f}"})

    @router.post(
        "/demonstration",
        response_model=DemonstrationAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
        openapi_extra=body_schema(DemonstrationRequest),
    )
    async def demonstration(request: Request):
        data = parse(DemonstrationRequest, await read_json(request))
        body = await service.demonstrate(
            data.pair_id,
            data.text,
            session_id=session(request, data.session_id),
            client=client(request),
        )
        return body.as_dict()

    @router.get(
        "/health",
        response_model=HealthAnswer,
        response_model_exclude_unset=True,
        responses={503: {"model": HealthAnswer}},
    )
    async def health(request: Request):
        body = await service.health(admin=is_admin(request))
        return JSONResponse(body, status_code=200 if body["engine"] else 503)

    @router.get("/versions", response_model=VersionsAnswer, response_model_exclude_unset=True)
    async def versions(request: Request):
        return await service.versions(admin=is_admin(request))

    @router.delete(
        "/conversations/{conversation_id}",
        response_model=DeletedAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def delete_conversation(conversation_id: str, request: Request):
        return await service.delete_conversation(conversation_id, session(request, None))

    @admin.post(
        "/retrain",
        response_model=RetrainAnswer,
        response_model_exclude_unset=True,
        responses={
            **ERRORS,
            202: {"model": RetrainStarted, "description": "started; Location: its status"},
        },
    )
    async def retrain(request: Request, wait: str = "false"):
        """Start a cycle: 202 with its run id at once. With `?wait=true` the answer is its
        summary, once the cycle has ended (up to its budget, 15 minutes by default)."""
        if wait not in ("true", "false"):
            raise InvalidInputError("'wait' must be true or false", 422)
        if wait == "true":
            return await loop.retrain()
        run_id = await loop.start()
        return JSONResponse(
            {"run_id": run_id, "status": "running"},
            status_code=202,
            headers={"Location": f"{router.prefix}/retrain/{run_id}"},
        )

    @admin.get(
        "/retrain/{run_id}",
        response_model=RetrainRun,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def retrain_run(run_id: str, request: Request):
        return await loop.run(run_id)

    @admin.get(
        "/retrain/{run_id}/events",
        responses={
            **ERRORS,
            200: {"content": {"text/event-stream": {}}, "description": "progress, then result"},
        },
    )
    async def retrain_events(run_id: str, request: Request):
        """Server-Sent Events: `progress` for each progress line (its `id` counts them; a
        reconnecting client's `Last-Event-ID` resumes after it), then one `result` with the
        summary, and the stream ends; a comment line when nothing happened for a while."""
        await loop.run(run_id)  # an unknown id is a 404, before the stream starts
        after = request.headers.get("last-event-id", "0")
        if not after.isdigit():
            raise InvalidInputError("Last-Event-ID must be the number of a progress event")

        async def stream():
            async for kind, n, body in loop.follow(run_id, int(after)):
                if kind == "quiet":
                    yield b": still running\n\n"
                else:
                    data = json.dumps(body, ensure_ascii=False, default=str)
                    yield f"event: {kind}\nid: {n}\ndata: {data}\n\n".encode()

        # no-store and X-Accel-Buffering: a proxy must pass each event on as it comes
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @admin.post("/retrain/{run_id}/cancel", responses=ERRORS)
    async def retrain_cancel(run_id: str, request: Request):
        """Stop a cycle while it trains (its worker, or its Ray job): it ends as failed,
        "cancelled by an admin", and nothing of it is deployed. 409 when it is not training
        (not running, still reading its votes, or already gating and deploying)."""
        return await loop.cancel(run_id)

    @admin.post(
        "/rollback",
        response_model=RollbackAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
        openapi_extra=body_schema(RollbackRequest),
    )
    async def rollback(request: Request):
        data = parse(RollbackRequest, await read_json(request))
        return await loop.rollback(data.version)

    @router.get("/canary", response_model=CanaryAnswer, response_model_exclude_unset=True)
    async def canary_status():
        return await canary.status()

    @admin.post(
        "/canary/promote",
        response_model=CanaryAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def canary_promote(request: Request):
        return await canary.promote()

    @admin.post(
        "/canary/retire",
        response_model=CanaryAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def canary_retire(request: Request):
        return await canary.retire()

    @router.get(
        "/prompt-variants", response_model=VariantsAnswer, response_model_exclude_unset=True
    )
    async def prompt_variants():
        return await variants.status()

    @admin.put(
        "/prompt-variants",
        response_model=VariantsAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def replace_prompt_variants(request: Request):
        return await variants.replace(await read_json(request))

    @admin.post(
        "/prompt-variants/default",
        response_model=VariantsAnswer,
        response_model_exclude_unset=True,
        responses=ERRORS,
        openapi_extra=body_schema(DefaultVariantRequest),
    )
    async def default_prompt_variant(request: Request):
        data = parse(DefaultVariantRequest, await read_json(request))
        return await variants.make_default(data.name)

    @admin.post(
        "/prune",
        response_model=PruneAnswer,
        responses=ERRORS,
        openapi_extra=body_schema(PruneRequest),
    )
    async def prune(request: Request):
        data = parse(PruneRequest, await read_json(request))
        return await loop.prune(data.keep)

    @router.get("/constitution", response_model=ConstitutionAnswer)
    async def constitution():
        return {
            "constitution": cai.constitution.as_json(),
            "backlog": await cai.backlog(),
            **await cai.agreement(),
        }

    @admin.put("/constitution", response_model=ConstitutionEditedAnswer, responses=ERRORS)
    async def edit_constitution(request: Request):
        version = await cai.replace_constitution(await read_json(request))
        return {"version": version, "constitution": cai.constitution.as_json()}

    @admin.get("/critiques/{candidate_id}", response_model=CritiquesAnswer, responses=ERRORS)
    async def critiques(candidate_id: str, request: Request):
        # a critique quotes someone's question and reply: the operator's to read, not everyone's
        return {"candidate_id": candidate_id, "rounds": await cai.chain(candidate_id)}

    @admin.get("/export")
    async def export(request: Request, format: str = "trl"):  # noqa: A002 - public name
        # every decisive vote's whole transcript: bulk reads of users' chats need the token
        if format not in FORMATS:
            raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}", 422)

        async def lines():
            async for record in service.preference_data(format):
                yield json.dumps(record, ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    router.include_router(admin)
    return router


def set_session_cookie(response, session_id: str) -> None:
    """HttpOnly: no script on the page can read it; SameSite=Strict: no other site's page can
    make the browser send it."""
    response.set_cookie(
        SESSION_COOKIE, session_id, httponly=True, samesite="strict", max_age=365 * 24 * 3600
    )
