"""The JSON API's contracts: one pydantic model per request body and per answer (vLLM's
`protocol.py` is the model). The routes and field names are pinned (docs/api.md); these models
are where they are written down once, and they feed the OpenAPI schema the app serves at
`GET /api/openapi.json`.

Requests are strict (a number is not a string) and ignore fields they do not know. Validation
failures keep the API's error shape `{"error": ...}`: a missing field is 400 ("missing
'message'"), a wrong type or value 422, naming the field. Content rules (an empty message,
control characters, length limits) belong to the chat service, which the page shares.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import InvalidInputError
from storage.rules import MAX_VOTER_CHARS, VOTE_CHOICES


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Answer(BaseModel):
    # answers carry what the service returns: fields the docs name, and any the service adds
    model_config = ConfigDict(extra="allow")


class ChatRequest(Request):
    message: str
    conversation_id: str | None = None
    session_id: str | None = None


class VoteRequest(Request):
    pair_id: str
    # the value is the chat service's to check (the page votes through it too): one rule
    choice: str = Field(json_schema_extra={"enum": list(VOTE_CHOICES)})
    voter: str | None = Field(
        None, max_length=MAX_VOTER_CHARS, description="who voted, in the client's own terms"
    )
    session_id: str | None = None


class DemonstrationRequest(Request):
    pair_id: str
    text: str = Field(description="the reply the user wanted, instead of both candidates")
    session_id: str | None = None


class DefaultVariantRequest(Request):
    name: str = Field(description="the prompt variant every ordinary turn uses from now on")


class RollbackRequest(Request):
    version: str = Field(description="a version name such as 'v0000'")


class PruneRequest(Request):
    keep: int = Field(3, ge=0, description="versions to keep besides the serving one")


class ErrorAnswer(BaseModel):
    error: str


class SessionAnswer(Answer):
    session_id: str


class Candidate(BaseModel):
    id: str
    text: str


class ChatAnswer(Answer):
    conversation_id: str
    pair_id: str
    candidates: list[Candidate]
    model_version: str


class VoteAnswer(Answer):
    vote_id: str
    pair_id: str
    choice: str
    conversation_id: str
    continued_with: str | None
    flagged: str | None
    versions: dict[str, str] = Field(description="slot -> the version that wrote that reply")
    variants: dict[str, str] | None = Field(
        None, description="slot -> prompt variant, only on pairs whose two variants differed"
    )


class DemonstrationAnswer(VoteAnswer):
    demonstration_id: str


class ReplicaAnswer(Answer):
    """One engine replica. `url` is the server's address for an admin; others see its place
    ("replica-1"), as engine addresses are private (docs/security.md)."""

    url: str
    version: str | None
    healthy: bool
    in_rotation: bool
    outstanding: int
    note: str | None = None


class HealthAnswer(Answer):
    status: Literal["ok", "degraded"]
    engine: bool
    model_version: str
    generating: int
    max_backlog: int
    replicas: list[ReplicaAnswer] = []


class VersionsAnswer(Answer):
    serving: str | None
    versions: list[dict[str, Any]]


class RetrainAnswer(Answer):
    status: Literal["challenger", "deployed", "rejected", "failed", "busy"] | str
    version: str | None = None


class RetrainStarted(Answer):
    run_id: str = Field(description="GET /api/retrain/{run_id} follows it")
    status: Literal["running"]


class RetrainRun(Answer):
    run_id: str
    status: str = Field(description='"running" until the cycle ends, then its summary\'s status')
    started_at: str
    finished_at: str | None = None
    events: list[dict[str, Any]] = Field(description="its progress lines so far")
    result: RetrainAnswer | None = Field(
        None, description="once it ended: the summary POST /api/retrain?wait=true answers"
    )


class RollbackAnswer(Answer):
    status: str
    version: str
    swap_seconds: float | None = None


class CanaryAnswer(Answer):
    challenger: str | None = None
    serving: str | None = None
    share: float | None = None
    votes: dict[str, int] | None = None
    win_rate: float | None = None
    interval: list[float] | None = None
    decision: str | None = None
    reason: str | None = None
    # shown beside win_rate, not decided on (alignment.style_control)
    win_rate_style_controlled: float | None = None
    interval_style_controlled: list[float] | None = None
    style_note: str | None = None
    style: dict[str, Any] | None = None


class VariantsAnswer(Answer):
    default: str
    share: float
    variants: list[dict[str, Any]]


class DeletedAnswer(Answer):
    deleted: str
    removed: dict[str, int]


class PruneAnswer(Answer):
    kept: list[str]
    pruned: list[str]
    freed_mb: float


class ConstitutionAnswer(Answer):
    constitution: dict[str, Any]
    backlog: dict[str, Any]
    agreement_rate: float | None
    pairs_compared: int


class ConstitutionEditedAnswer(Answer):
    version: int
    constitution: dict[str, Any]


class CritiquesAnswer(Answer):
    candidate_id: str
    rounds: list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def parse(model: type[Request], data: dict) -> Request:
    """`data` as `model`, or the API's own 400/422 naming the first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "body"
        if problem["type"] == "missing":
            raise InvalidInputError(f"missing '{field}'") from None
        raise InvalidInputError(f"'{field}': {problem['msg']}", 422) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a route that reads its body itself (to refuse an oversized
    one while it arrives): the schema is documented though FastAPI does not parse it."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }
