"""`Engine` over a vLLM OpenAI-compatible server: the embedded one we start, or an external one.

One implementation serves both deployments, so what is tested here is what runs on a GPU box or
against a cluster behind a URL. A turn is one `/v1/chat/completions` request with `n=2` and a seed
(vLLM gives child i the seed `seed + i`), streamed; the engine batches concurrent turns.

Weight swaps use the server's own endpoints: `/pause?mode=wait` (in-flight requests finish, new
ones queue), `/collective_rpc` `reload_weights`, `/reset_prefix_cache` (cached blocks computed with
the old weights must not be reused) and `/resume`. The server must run with
`VLLM_SERVER_DEV_MODE=1` for the last three; the embedded one does.

Each reply must be recorded with the version whose weights produced it (ratings and canary counts
depend on it). The server's pause queues new requests and runs them on the new weights after the
swap, so a version read when a request is sent would be the old one. `_SwapGate` makes the
client say exactly: a swap first waits for this client's pairs in flight (they are old-version
replies), pairs asked for meanwhile wait for the swap and are labelled with what it installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx

from engine.http import async_client
from engine.protocol import (
    CandidateDraft,
    Challenger,
    EngineError,
    EngineRequestError,
    PairProgress,
    PromptTooLongError,
    WeightsLoadError,
)


def as_text(generated: str) -> str:
    """A model's output as text a page can show and every store can hold: NUL, which a model
    can emit (the tiny test models do) and Postgres refuses in text, becomes U+FFFD."""
    return generated.replace("\x00", "\ufffd")


class AdaptersUnsupportedError(EngineError):
    """The server has no run-time adapter loading (no canary there, no versions-folder probe)."""


class _SwapGate:
    """A writer-first readers-writer lock: pairs are readers, a weight swap is the writer."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._swaps = asyncio.Lock()

    @asynccontextmanager
    async def request(self):
        await self._open.wait()
        # no await between the check and the count: a swap that starts now waits for this one
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    @asynccontextmanager
    async def swap(self):
        async with self._swaps:
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._open.set()


class VLLMServerEngine:
    """The `Engine` over one vLLM OpenAI-compatible server (embedded on a private socket, or
    external by URL): pairs as one `n=2` request (or one per version or prompt variant),
    streamed; weight swaps through the server's pause/reload/resume routes behind `_SwapGate`,
    so each reply is labelled with the weights that wrote it; challengers as LoRA adapters.
    One client per server: several replicas are several of these (`engine.replicas`)."""

    def __init__(
        self, base_url: str, model_name: str, model_version: str, request_timeout_s: float = 600.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self._version = model_version
        self._http = async_client(
            self.base_url,
            timeout=httpx.Timeout(request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._gate = _SwapGate()
        self._adapters: set[str] = set()  # challengers loaded as LoRA adapters

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def adapters(self) -> frozenset[str]:
        return frozenset(self._adapters)

    async def served_version(self) -> str:
        """The version the server says its weights are (`/weight_info`): what the app named
        them at the last swap, or vLLM's "default" for the weights it started with."""
        resp = await self._call("GET", "/weight_info", timeout=5.0)
        try:
            return str(resp.json()["weight_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(
                f"the engine at {self.base_url} answered /weight_info without a version "
                "(it needs VLLM_SERVER_DEV_MODE=1)"
            ) from exc

    async def name_weights(self, version: str) -> None:
        """Tell the server which version its weights are (no swap), and label replies so."""
        await self._post("/update_weight_version", json={"new_version": version})
        self._version = version

    async def healthy(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def stream_pair(
        self,
        messages: list[dict[str, str]],
        sampling: dict,
        seed: int,
        challenger: Challenger | None = None,
        per_candidate: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None,
    ) -> AsyncIterator[PairProgress]:
        async with self._gate.request():
            # read inside the gate: no swap can start or finish while this pair generates
            version = self._version
            if challenger is not None and (
                challenger.version not in self._adapters or challenger.version == version
            ):
                # the canary ended while this turn waited (retired: unloaded; promoted: it
                # serves now, and its adapter on its own weights would apply it twice)
                challenger = None
            drafts = (
                CandidateDraft(0, seed, model_version=version),
                CandidateDraft(1, seed + 1, model_version=version),
            )
            if per_candidate is not None:  # a prompt-variant pair: one request per prompt
                requests = [
                    (self._body(per_candidate[d.index], sampling, d.seed, self.model_name, 1), (d,))
                    for d in drafts
                ]
            elif challenger is None:  # one request, n=2: the engine batches the two samples
                requests = [(self._body(messages, sampling, seed, self.model_name, 2), drafts)]
            else:  # a canary pair: one request per version, concurrently
                drafts[challenger.slot].model_version = challenger.version
                requests = [
                    (
                        self._body(
                            messages,
                            sampling,
                            d.seed,
                            challenger.version if d.index == challenger.slot else self.model_name,
                            1,
                        ),
                        (d,),
                    )
                    for d in drafts
                ]
            async for progress in self._stream(requests, drafts, version, sampling):
                yield progress

    @staticmethod
    def _body(messages, sampling: dict, seed: int, model: str, n: int) -> dict:
        return {
            "model": model,
            "messages": messages,
            "n": n,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            **sampling,
        }

    async def _stream(
        self,
        requests: list[tuple[dict, tuple[CandidateDraft, ...]]],
        drafts: tuple[CandidateDraft, CandidateDraft],
        version: str,
        sampling: dict,
    ) -> AsyncIterator[PairProgress]:
        """Run the requests concurrently, each filling its drafts (its choice i -> drafts[i]),
        and yield a snapshot of the pair whenever either changes."""
        changes: asyncio.Queue = asyncio.Queue()
        prompt_tokens: list[int] = []
        started = time.perf_counter()

        async def run(body: dict, targets: tuple[CandidateDraft, ...]) -> None:
            try:
                async for chunk in self._chunks(body):
                    if chunk.get("prompt_token_ids") is not None and not prompt_tokens:
                        prompt_tokens.append(len(chunk["prompt_token_ids"]))
                    changed = False
                    for choice in chunk.get("choices") or []:
                        draft = _draft_for(choice, targets)
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            draft.text += as_text(delta["content"])
                            changed = True
                        draft.completion_tokens += len(choice.get("token_ids") or [])
                        if choice.get("finish_reason"):
                            draft.finish_reason = choice["finish_reason"]
                            draft.latency_ms = (time.perf_counter() - started) * 1000
                            changed = True
                    if changed:
                        changes.put_nowait("changed")
                changes.put_nowait("done")
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
                changes.put_nowait(exc)

        tasks = [asyncio.create_task(run(body, targets)) for body, targets in requests]
        try:
            running = len(tasks)
            while running:
                item = await changes.get()
                if isinstance(item, Exception):
                    raise item
                if item == "done":
                    running -= 1
                    continue
                tokens = prompt_tokens[0] if prompt_tokens else None
                yield PairProgress(drafts, version, tokens, sampling=sampling)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not all(d.done for d in drafts):
            raise EngineError("the engine ended the reply stream before both candidates finished")
        tokens = prompt_tokens[0] if prompt_tokens else None
        yield PairProgress(drafts, version, tokens, final=True, sampling=sampling)

    async def _chunks(self, body: dict) -> AsyncIterator[dict]:
        """The parsed server-sent events of one streamed chat request."""
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _error_from(resp)
                async for line in _event_stream_lines(resp):
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: ") :]
                    if payload == "[DONE]":
                        return
                    try:
                        chunk = json.loads(payload)
                    except ValueError as exc:
                        raise EngineError(
                            f"the engine sent an unreadable reply chunk: {payload[:200]!r}"
                        ) from exc
                    if not isinstance(chunk, dict):
                        raise EngineError(f"the engine sent an unexpected chunk: {payload[:200]!r}")
                    if "error" in chunk:
                        error = chunk["error"]
                        text = error.get("message", "") if isinstance(error, dict) else str(error)
                        if _says_too_long(text):
                            raise PromptTooLongError(text)
                        raise EngineError(f"the engine failed mid-reply: {text}")
                    yield chunk
        except httpx.HTTPError as exc:
            raise EngineError(f"the engine at {self.base_url} is unreachable: {exc!r}") from exc

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under `name` (the server needs --enable-lora and
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=1; the embedded one has both)."""
        try:
            resp = await self._http.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
            )
        except httpx.HTTPError as exc:
            raise EngineError(f"the engine at {self.base_url} is unreachable: {exc!r}") from exc
        if resp.status_code == 404 and "lora" not in resp.text.lower():
            raise AdaptersUnsupportedError(
                f"the engine at {self.base_url} does not load adapters while it runs: start it "
                "with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
            )
        if resp.status_code != 200 and "already" not in resp.text:
            raise EngineError(
                f"the engine could not load the adapter {name}: {resp.status_code} "
                f"{resp.text[:300]}"
            )
        self._adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        """Unload once this client's pairs in flight (some may use it) have finished."""
        async with self._gate.swap():
            self._adapters.discard(name)
            with contextlib.suppress(httpx.HTTPError):  # not loaded (an engine restart): fine
                await self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})

    async def forward_chat(self, body: dict, challenger: str | None = None) -> AsyncIterator[bytes]:
        """An OpenAI chat-completions request passed through as it is (the model name set to
        the served one, or to `challenger`'s adapter while it is loaded), its answer's bytes as
        they come: JSON, or server-sent events when `body["stream"]`. For the app's
        OpenAI-compatible route."""
        async with self._gate.request():
            model = challenger if challenger in self._adapters else self.model_name
            request = self._http.build_request(
                "POST", "/v1/chat/completions", json={**body, "model": model}
            )
            try:
                resp = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise EngineError(f"the engine at {self.base_url} is unreachable: {exc!r}") from exc
            try:
                if resp.status_code >= 400:
                    await resp.aread()
                    error = _error_from(resp)
                    if 400 <= resp.status_code < 500 and not isinstance(error, PromptTooLongError):
                        raise EngineRequestError(str(error), resp.status_code)
                    raise error
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

    async def complete(self, messages: list[dict[str, str]], sampling: dict, seed: int) -> str:
        """One reply, not streamed (critiques and revisions)."""
        body = {"model": self.model_name, "messages": messages, "seed": seed, **sampling}
        resp = await self._post("/v1/chat/completions", json=body)
        return as_text(resp.json()["choices"][0]["message"]["content"] or "")

    async def option_probabilities(
        self, messages: list[dict[str, str]], options: tuple[str, ...]
    ) -> dict[str, float]:
        """The model's next-token probability of each option (e.g. "A", "B"), read from its
        top log-probabilities rather than parsed from sampled text; 0.0 if not in the top 20."""
        body = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 20,
        }
        resp = await self._post("/v1/chat/completions", json=body)
        content = resp.json()["choices"][0]["logprobs"]["content"]
        probs = dict.fromkeys(options, 0.0)
        for entry in content[0]["top_logprobs"] if content else []:
            token = entry["token"].strip()
            if token in probs:
                probs[token] += math.exp(entry["logprob"])
        return probs

    async def reload_weights(
        self, path: str, version: str, commit: Callable[[float], Awaitable[None]] | None = None
    ) -> float:
        """Swap weights in place without failing requests: in-flight ones drain first.

        `commit(seconds)` runs after the swap while pairs are still held at the gate, so what
        it records (the store's serving version, a canary's verdict) is in place before any
        reply labelled with the new version can be written: a user never sees a reply from a
        version that the app does not yet say serves."""
        started = time.perf_counter()
        async with self._gate.swap():
            # other clients' requests (the worker's rollouts) drain on the server's side
            await self._post("/pause", params={"mode": "wait"})
            load_failed = False
            try:
                try:
                    await self._post(
                        "/collective_rpc",
                        json={"method": "reload_weights", "kwargs": {"weights_path": path}},
                    )
                except EngineError as exc:
                    load_failed = True
                    raise WeightsLoadError(f"{exc} (loading {version} from {path})") from (
                        exc.__cause__ or exc
                    )
                await self._post("/reset_prefix_cache")
                # the server's own record, so the app reads the truth after a restart
                await self._post("/update_weight_version", json={"new_version": version})
                self._version = version
            finally:
                try:
                    await self._post("/resume")
                except EngineError:
                    # an engine that died of the load cannot resume: the caller must hear
                    # that the load failed, not only that the engine stopped answering
                    if not load_failed:
                        raise
            seconds = time.perf_counter() - started
            if commit is not None:
                await commit(seconds)
        return seconds

    async def _post(self, route: str, **kwargs) -> httpx.Response:
        return await self._call("POST", route, **kwargs)

    async def _call(self, method: str, route: str, **kwargs) -> httpx.Response:
        try:
            resp = await self._http.request(method, route, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineError(f"the engine at {self.base_url} is unreachable: {exc!r}") from exc
        if resp.status_code >= 400:
            raise _error_from(resp)
        return resp

    async def metrics(self) -> str:
        """vLLM's own Prometheus metrics (queue, KV cache, tokens), as the server writes them."""
        return (await self._call("GET", "/metrics")).text

    async def aclose(self) -> None:
        await self._http.aclose()


async def _event_stream_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, which end only at "\n" (or "\r\n").

    Not httpx's `aiter_lines`: it splits at every line boundary `str.splitlines` knows, U+2028,
    U+0085 and others included, and vLLM writes the reply's text into its JSON unescaped, so a
    reply holding one of those characters arrived as a cut chunk: a failed turn in 3 of 12
    `bench.load` runs on the tiny random model (bench/RESULTS.md)."""
    pending = ""
    async for text in resp.aiter_text():
        lines = (pending + text).split("\n")
        pending = lines.pop()
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


def _draft_for(choice: dict, targets: tuple[CandidateDraft, ...]) -> CandidateDraft:
    """The draft a streamed choice fills; a choice that names none of them is the engine's
    fault, so it surfaces as an `EngineError` (a 502 for the user), not a server error."""
    index = choice.get("index") if isinstance(choice, dict) else None
    if not isinstance(index, int) or not 0 <= index < len(targets):
        raise EngineError(f"the engine streamed a choice this request did not ask for: {index!r}")
    return targets[index]


def _error_from(resp: httpx.Response) -> EngineError:
    try:
        detail = resp.json()
        message = (
            (detail.get("error") or {}).get("message")
            if isinstance(detail.get("error"), dict)
            else detail.get("detail") or detail.get("message")
        )
    except ValueError:
        message = resp.text
    message = str(message or resp.reason_phrase)
    if resp.status_code in (400, 413) and _says_too_long(message):
        return PromptTooLongError(message)
    return EngineError(f"engine error {resp.status_code}: {message}")


def _says_too_long(message: str) -> bool:
    """vLLM words "prompt + reply do not fit the context window" several ways."""
    lower = message.lower()
    return any(
        k in lower
        for k in ("context length", "maximum model length", "longer than the maximum", "too long")
    )
