"""The chat service: one turn in, two candidates out; one vote in, the conversation goes on.

The page and the JSON API both call this; it calls the engine for replies and the store for
everything that must last. It knows no HTTP and no widgets: errors are exceptions that the edges
map to status codes or page messages.

Admission control lives here because vLLM's waiting queue is unbounded: past `max_backlog` turns
generating at once, a new turn is refused with `BusyError` (HTTP 503 + Retry-After) instead of
joining an ever-growing wait.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import secrets
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from alignment.monitors import annotated_versions
from assistant.config import SamplingConfig, ServeConfig
from assistant.limits import SessionLimit, VoteLimits
from assistant.prompt_variants import PromptVariants, shipped_variants
from engine.protocol import Challenger, Engine, PairProgress
from storage import AppError, ConflictError, InvalidInputError, Store
from storage.export import demonstration_records, preference_records
from storage.rules import check_storable
from storage.store import CandidateRecord, RecordedVote, VoteWrite

SLOTS = ("a", "b")


class RateLimitError(AppError):
    """A session, an address or everybody votes faster than allowed, or one client already
    has its share of the backlog generating; retry after `retry_after_s` seconds (HTTP 429)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BusyError(AppError):
    """Too many turns are generating; retry after `retry_after_s` seconds (HTTP 503)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _public_note(replica, admin: bool) -> str | None:
    """Why a replica is out of rotation: the whole reason for an admin; for anyone else only its
    state, since the reasons name engine addresses and folders (docs/security.md)."""
    if admin or replica.note is None:
        return replica.note
    return "not answering" if not replica.healthy else "out of rotation"


# Manifest entries that name places on the server (checkpoint and run folders, the engine URL).
_PRIVATE_MANIFEST_KEYS = ("path", "model", "reward_model", "job", "engine_url", "serving_model")


def public_version(row: dict) -> dict:
    """A version record with no server path or URL in it, for callers without the token."""
    out = {k: v for k, v in row.items() if k != "path"}
    out["manifest"] = _without_paths(row.get("manifest") or {})
    return out


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k not in _PRIVATE_MANIFEST_KEYS}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


@dataclass(frozen=True)
class TurnResult:
    conversation_id: str
    pair_id: str
    candidates: tuple[dict[str, str], dict[str, str]]  # [{"id", "text"}, ...] for A and B
    model_version: str

    def as_json(self) -> dict:
        return {
            "conversation_id": self.conversation_id,
            "pair_id": self.pair_id,
            "candidates": list(self.candidates),
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class TurnUpdate:
    """What the page shows while a turn streams; `result` is set once the pair is stored."""

    conversation_id: str
    text_a: str
    text_b: str
    model_version: str
    result: TurnResult | None = None


def validate_message(message: object, max_chars: int, name: str = "message") -> str:
    """A user's text (a message, or a reply they wrote): a non-empty string within the limit,
    without control characters, that the database can store."""
    if not isinstance(message, str):
        raise InvalidInputError(f"'{name}' must be a string", 422)
    if not message.strip():
        raise InvalidInputError(f"'{name}' is empty: type something")
    if len(message) > max_chars:
        raise InvalidInputError(
            f"'{name}' is {len(message)} characters; the limit is {max_chars}", 413
        )
    bad = {c for c in message if unicodedata.category(c) == "Cc" and c not in "\n\r\t"}
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in sorted(bad))
        raise InvalidInputError(f"'{name}' contains control characters ({codes})")
    check_storable(message, name)
    return message


class Canary(Protocol):
    """The running canary as the chat service sees it (`assistant.canary_service`)."""

    def pick(self) -> Challenger | None:
        """The challenger and its slot for this turn's pair, or None for an ordinary pair."""
        ...

    async def vote_cast(self, versions: dict[str, str]) -> None: ...

    @property
    def challenger_version(self) -> str | None:
        """The running canary's challenger, else None."""
        ...


class ChatService:
    """What users do, whoever asks (the page, the JSON API, the OpenAI-compatible route): a
    turn answered by two candidates streamed from the engine and stored as one pair, a vote
    (or a reply the user wrote) that continues the conversation, deletion, and the admission
    rules in front of them (backlog and its share per address, vote and session limits).

    It knows the engine only by its protocol (`engine.protocol.Engine`) and the store by its
    calls; it knows no screen and no HTTP: errors are `AppError`s the edges turn into answers.
    Which pairs are canary pairs is the canary's to say (`pick`), which prompt each candidate
    gets the prompt variants'."""

    def __init__(
        self, store: Store, engine: Engine, sampling: SamplingConfig, serve: ServeConfig
    ) -> None:
        self.store = store
        self.engine = engine
        self.sampling = sampling
        self.serve = serve
        self._generating = 0
        # whether this process leads among those sharing the database (set by the app)
        self.leading: Callable[[], bool] = lambda: True
        self.engine_note: str | None = None  # set while the engine is being restarted
        self.vote_limits = VoteLimits(
            serve.max_votes_per_minute,
            serve.max_votes_per_minute_per_address,
            serve.max_votes_per_minute_total,
        )
        self.session_limit = SessionLimit(serve.max_sessions_per_minute_per_address)
        self._generating_by_client: collections.Counter[str] = collections.Counter()
        self._conversations_generating: set[str] = set()
        self.canary: Canary | None = None
        self.variants: PromptVariants = shipped_variants()  # the app loads the admin's
        self._rng = random.Random()

    @property
    def model_version(self) -> str:
        return self.engine.model_version

    @property
    def generating(self) -> int:
        return self._generating

    # --- turns --------------------------------------------------------------------------

    @property
    def backlog_per_client(self) -> int:
        """Turns one client address may have generating at once (its share of the backlog)."""
        return max(1, math.floor(self.serve.max_backlog * self.serve.max_backlog_share))

    async def stream_turn(
        self,
        conversation_id: str | None,
        message: object,
        *,
        session_id: str | None = None,
        client: str | None = None,
    ) -> AsyncIterator[TurnUpdate]:
        """Generate both candidates for a user turn, streaming, then store the pair atomically.

        Nothing is stored until both candidates are complete: a failed or cancelled turn
        leaves no half-written pair behind.
        """
        text = validate_message(message, self.serve.max_message_chars)
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise InvalidInputError("'conversation_id' must be a string", 422)
        self._admit(client)
        claimed: str | None = None
        try:
            opened = await asyncio.to_thread(self.store.open_turn, conversation_id, session_id)
            conversation_id = opened.conversation_id
            if conversation_id in self._conversations_generating:
                raise ConflictError("this conversation is already generating a reply; wait")
            self._conversations_generating.add(conversation_id)
            claimed = conversation_id
            if opened.pending_pair is not None:
                raise ConflictError(
                    f"vote on pair {opened.pending_pair} first: the chosen reply continues the "
                    "conversation"
                )
            conversation = [*opened.history, {"role": "user", "content": text}]
            seed = secrets.randbelow(2**31 - 2)
            last: PairProgress | None = None
            challenger = self.canary.pick() if self.canary is not None else None
            prompt, per_candidate, arms = self._prompts(conversation, challenger is None)
            stream = self.engine.stream_pair(
                prompt, self.sampling.as_dict(), seed, challenger, per_candidate
            )
            async for progress in stream:
                last = progress
                a, b = progress.candidates
                yield TurnUpdate(conversation_id, a.text, b.text, progress.model_version)
            assert last is not None and last.final
            records = tuple(
                CandidateRecord(
                    slot=SLOTS[d.index],
                    text=d.text,
                    model_version=d.model_version or last.model_version,
                    sampling={**last.sampling, "seed": d.seed, "variant": arms[d.index]},
                    prompt_tokens=last.prompt_tokens,
                    completion_tokens=d.completion_tokens,
                    finish_reason=d.finish_reason,
                    latency_ms=d.latency_ms,
                )
                for d in last.candidates
            )
            stored = await asyncio.to_thread(
                self.store.record_pair,
                conversation_id,
                text,
                prompt,
                last.model_version,
                seed,
                records,
            )
            result = TurnResult(
                conversation_id,
                stored.pair_id,
                tuple(
                    {"id": cid, "text": r.text}
                    for cid, r in zip(stored.candidate_ids, records, strict=True)
                ),
                last.model_version,
            )
            yield TurnUpdate(
                conversation_id, records[0].text, records[1].text, last.model_version, result
            )
        finally:
            self._release(client)
            if claimed is not None:
                self._conversations_generating.discard(claimed)

    def _admit(self, client: str | None) -> None:
        """Take a place in the backlog for one generation, or refuse it (503 engine down or
        backlog full, 429 this address's share taken). No await: a burst cannot slip past."""
        if self.engine_note is not None:
            raise BusyError(
                f"{self.engine_note}; retry in {self.serve.retry_after_s} s",
                self.serve.retry_after_s,
            )
        if self._generating >= self.serve.max_backlog:
            raise BusyError(
                f"busy: {self._generating} replies are being generated; retry in "
                f"{self.serve.retry_after_s} s",
                self.serve.retry_after_s,
            )
        if client is not None and self._generating_by_client[client] >= self.backlog_per_client:
            raise RateLimitError(
                f"this address already has {self.backlog_per_client} replies generating (its "
                f"share of the {self.serve.max_backlog} places); retry in "
                f"{self.serve.retry_after_s} s",
                self.serve.retry_after_s,
            )
        self._generating += 1
        if client is not None:
            self._generating_by_client[client] += 1

    def _release(self, client: str | None) -> None:
        self._generating -= 1
        if client is not None:
            self._generating_by_client[client] -= 1
            if not self._generating_by_client[client]:
                del self._generating_by_client[client]

    @property
    def challenger_version(self) -> str | None:
        """The version a running canary is trying on some pairs, if any."""
        return self.canary.challenger_version if self.canary is not None else None

    async def openai_chat(
        self, body: object, *, client: str | None = None, challenger: bool = False
    ) -> AsyncIterator[bytes]:
        """An OpenAI chat-completions request answered by the serving version (or, asked by
        name, the running challenger), for other tools (Open WebUI's arena, LangChain, an
        OpenAI client): one reply, not a pair, not logged; it takes a place in the backlog like
        a turn. It is prompted as the page's turns are: the default prompt variant and
        `--system-prompt`, unless the request brings a system message of its own."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise InvalidInputError("'messages' must be a list of chat messages", 422)
        if not isinstance(body.get("n", 1), int) or body.get("n", 1) != 1:
            raise InvalidInputError(
                "'n' must be 1 on this route: one reply per request (the page's pairs are how "
                "this app compares two replies; ask twice for two)",
                422,
            )
        version = self.challenger_version if challenger else None
        if challenger and version is None:
            raise InvalidInputError("no challenger is being tried now: ask for the serving model")
        messages = body["messages"]
        if not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            default = self.variants.by_name[self.variants.default]
            messages = default.messages(messages, self.serve.system_prompt)
        self._admit(client)
        try:
            async for chunk in self.engine.forward_chat({**body, "messages": messages}, version):
                yield chunk
        finally:
            self._release(client)

    async def chat(
        self,
        conversation_id: str | None,
        message: object,
        *,
        session_id: str | None = None,
        client: str | None = None,
    ) -> TurnResult:
        """One whole turn, not streamed (the JSON API)."""
        result = None
        async for update in self.stream_turn(
            conversation_id, message, session_id=session_id, client=client
        ):
            result = update.result
        assert result is not None
        return result

    def _prompts(
        self, conversation: list[dict[str, str]], may_vary: bool
    ) -> tuple[list[dict[str, str]], tuple[list, list] | None, tuple[str, str]]:
        """(the prompt stored with the pair, each candidate's own prompt or None, each
        candidate's variant). Ordinary turns use the default variant for both; on
        `variant_share` of the others (never a canary pair) the two candidates get two
        different variants, and the pair stores the conversation as it is."""
        variants, system = self.variants, self.serve.system_prompt
        share = self.serve.variant_share
        if may_vary and share > 0 and len(variants.variants) > 1 and self._rng.random() < share:
            a, b = variants.pick_pair(self._rng)
            plain = [{"role": "system", "content": system}] if system else []
            per_candidate = (a.messages(conversation, system), b.messages(conversation, system))
            return plain + conversation, per_candidate, (a.name, b.name)
        default = variants.by_name[variants.default]
        return default.messages(conversation, system), None, (default.name, default.name)

    # --- sessions and votes -------------------------------------------------------------

    def admit_session(self, client: str | None) -> None:
        """Count one new session against its address's allowance, or raise RateLimitError
        (429). A session is one voter to the vote limits and a cycle's sources: minting them
        freely would multiply both."""
        if (refusal := self.session_limit.charge(client)) is not None:
            raise RateLimitError(refusal.message, refusal.retry_after_s)

    async def vote(
        self,
        pair_id: object,
        choice: object,
        *,
        voter: str | None = None,
        session_id: str | None = None,
        client: str | None = None,
        demonstration: str | None = None,
    ) -> RecordedVote:
        """`client` is the caller's address tag: votes are limited per session, per address
        and in total, and the address tag is stored to see one client steering a cycle.

        One store call: the allowance is charged inside the vote's transaction, once the pair
        is known to exist and to be this session's to vote on (a refused vote costs nothing)."""
        if not isinstance(pair_id, str) or not pair_id:
            raise InvalidInputError("'pair_id' must be a non-empty string", 422)

        def admit(age: float, words: int) -> str | None:
            if (refusal := self.vote_limits.charge(session_id, client)) is not None:
                raise RateLimitError(refusal.message, refusal.retry_after_s)
            wps = self.serve.reading_words_per_second
            if wps > 0 and age < words / wps:
                return (
                    f"voted {age:.1f} s after the replies; reading {words} words "
                    f"needs {words / wps:.1f} s"
                )
            return None

        write = VoteWrite(pair_id, choice, voter, session_id, client, admit, demonstration)
        # On this thread: a recent pair's vote comes back answered from the store's journal,
        # and is taken without yielding to the loop (under load every hand-off waited for a
        # core, bench/RESULTS.md). Otherwise awaited on the store's writer thread (group
        # commit), not through the turns' pool.
        stored = self.store.vote(write)
        recorded = stored.result() if stored.done() else await asyncio.wrap_future(stored)
        if self.canary is not None and recorded.flagged is None:
            await self.canary.vote_cast(recorded.versions)
        return recorded

    async def demonstrate(
        self,
        pair_id: object,
        text: object,
        *,
        session_id: str | None = None,
        client: str | None = None,
    ) -> RecordedVote:
        """Both replies were bad and the user wrote the reply they wanted: it is recorded as a
        both-bad vote with that demonstration, continues the conversation, and trains the SFT
        stage. Same session rules, limits and pacing as a vote."""
        reply = validate_message(text, self.serve.max_message_chars, "text")
        return await self.vote(
            pair_id, "both_bad", session_id=session_id, client=client, demonstration=reply
        )

    async def preference_data(self, fmt: str, page: int = 500) -> AsyncIterator[dict]:
        """Decisive votes as preference records (`trl` or `hh`), for export: read a page at a
        time off the event loop, so a large export neither holds everything in memory nor
        stalls the chat. `sft`: the users' demonstrations instead (a few per hundred votes)."""
        if fmt == "sft":
            for record in demonstration_records(await asyncio.to_thread(self.store.demonstrations)):
                yield record
            return
        after = None
        while True:
            rows = await asyncio.to_thread(self.store.voted_pairs, after, page)
            for record in preference_records(rows, fmt):
                yield record
            if len(rows) < page:
                return
            after = (rows[-1]["voted_at"], rows[-1]["vote_id"])

    # --- status -------------------------------------------------------------------------

    async def delete_conversation(self, conversation_id: str, session_id: str | None) -> dict:
        """A user deletes their own conversation: everything recorded from it goes, so export
        and later cycles never see it. Versions already trained keep what they learned."""
        if not isinstance(conversation_id, str) or not conversation_id:
            raise InvalidInputError("'conversation_id' must be a non-empty string", 422)
        await asyncio.to_thread(self.store.check_owner, conversation_id, session_id)
        removed = await asyncio.to_thread(self.store.delete_conversation, conversation_id)
        return {"deleted": conversation_id, "removed": removed}

    async def versions(self, admin: bool = False) -> dict:
        """Versions with their metrics, the users' rating of each, reward-hacking monitors and
        warnings; checkpoint paths and run folders only for the admin."""

        rows = await asyncio.to_thread(annotated_versions, self.store)
        if not admin:
            rows = [public_version(r) for r in rows]
        return {"serving": self.model_version, "versions": rows}

    async def health(self, admin: bool = False) -> dict:
        engine_ok = self.engine_note is None and await self.engine.healthy()
        replicas = [
            {**asdict(r), "url": r.url if admin else f"replica-{i}", "note": _public_note(r, admin)}
            for i, r in enumerate(self.engine.statuses(), start=1)
        ]
        return {
            "replicas": replicas,
            "status": "ok" if engine_ok else "degraded",
            "note": self.engine_note,
            "engine": engine_ok,
            "model_version": self.model_version,
            # several app processes on one database: whether this one leads (assistant.leadership)
            "leader": self.leading(),
            "generating": self._generating,
            "max_backlog": self.serve.max_backlog,
            # acknowledged records the database refused, kept aside (storage.set_aside)
            "set_aside_writes": self.store.set_aside.count,
        }
