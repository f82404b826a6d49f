"""The engine interface against a real vLLM server: pairs, streaming, and in-place weight reload."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.protocol import EngineError, PromptTooLongError
from engine.vllm_client import VLLMServerEngine
from harness.tiny_model import build_tiny_checkpoint

# Seeded sampling is reproducible (vLLM does not allow n=2 at temperature 0).
SEEDED = {"temperature": 1.0, "max_tokens": 12}
PROMPT = [{"role": "user", "content": "Why do things fall down?"}]


async def complete(engine, messages=PROMPT, sampling=SEEDED, seed=1):
    updates = [u async for u in engine.stream_pair(messages, sampling, seed)]
    return updates


async def texts(engine):
    """(the version the final update names, both candidates' texts) of one seeded pair."""
    final = (await complete(engine))[-1]
    return final.model_version, [c.text for c in final.candidates]


def test_stream_pair_grows_then_finishes_both(tiny_engine_url):
    async def run():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        try:
            return await complete(engine, sampling={"temperature": 1.0, "max_tokens": 12})
        finally:
            await engine.aclose()

    updates = asyncio.run(run())
    assert len(updates) > 2  # streamed, not one final blob
    assert updates[-1].final and not any(u.final for u in updates[:-1])
    lengths = [len(u.candidates[0].text) + len(u.candidates[1].text) for u in updates]
    assert lengths == sorted(lengths)
    a, b = updates[-1].candidates
    assert (a.seed, b.seed) == (1, 2)
    assert a.done and b.done and a.completion_tokens == 12 == b.completion_tokens
    assert updates[-1].prompt_tokens > 0


def test_prompt_over_context_raises_prompt_too_long(tiny_engine_url):
    async def run():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        try:
            await complete(engine, [{"role": "user", "content": "gravity " * 2000}])
        finally:
            await engine.aclose()

    with pytest.raises(PromptTooLongError):
        asyncio.run(run())


def test_reload_weights_swaps_outputs_and_restores_exactly(
    tiny_engine_url, tiny_model_dir, tmp_path, restores_tiny_engine
):
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)

    async def run():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        try:
            before = await texts(engine)
            # Requests in flight during the swap must all complete, on old or new weights.
            loads = [
                asyncio.create_task(
                    complete(engine, sampling={"temperature": 1.0, "max_tokens": 64}, seed=i)
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.05)
            seconds = await engine.reload_weights(str(other), "v0001")
            in_flight = await asyncio.gather(*loads)
            swapped = await texts(engine)
            await engine.reload_weights(str(tiny_model_dir), "v0000")
            restored = await texts(engine)
            return before, swapped, restored, seconds, in_flight
        finally:
            await engine.aclose()

    before, swapped, restored, seconds, in_flight = asyncio.run(run())
    assert swapped[0] == "v0001" and swapped[1] != before[1]
    assert restored == before  # same seeded output after reloading the original weights
    assert seconds > 0
    for updates in in_flight:
        assert updates[-1].final
        assert all(c.finish_reason in ("stop", "length") for c in updates[-1].candidates)


def test_pairs_asked_for_during_a_swap_are_labelled_with_the_weights_that_answer_them(
    tiny_engine_url, tmp_path, restores_tiny_engine
):
    """The server queues requests that arrive while a swap drains and answers them with the new
    weights; their candidates must say so (every rating and canary count reads this label). The
    same seeded request before and after the swap also shows that the reload changed what the
    engine generates (vLLM #32718: reloads that kept serving stale weights)."""
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)

    async def run():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        try:
            old = await texts(engine)
            # a pair in flight, its stream held open: the swap has to drain it
            held = engine.stream_pair(PROMPT, {"temperature": 1.0, "max_tokens": 64}, 9)
            drained = await anext(held)
            swap = asyncio.create_task(engine.reload_weights(str(other), "v0001"))
            await asyncio.sleep(0.05)
            during = [asyncio.create_task(texts(engine)) for _ in range(3)]
            await asyncio.sleep(0.05)  # they are asked for now, while the swap drains
            overlapped = not swap.done()
            drained = [u async for u in held][-1]
            await swap
            during = await asyncio.gather(*during)
            new = await texts(engine)
        finally:
            await engine.aclose()
        return old, drained, during, new, overlapped

    old, drained, during, new, overlapped = asyncio.run(run())
    assert overlapped, "the swap finished before the pair it should drain did"
    assert drained.model_version == "v0000"  # it ran on the old weights before the swap
    assert new[0] == "v0001" and new[1] != old[1]
    assert during == [new] * 3  # new weights' text, and labelled v0001


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 512 tokens. However, you requested 600 tokens.",
        "The decoder prompt (length 520) is longer than the maximum model length of 512.",
        "'max_tokens' is too large: 8. This model's maximum context length is 512 tokens",
    ],
)
def test_context_overflow_messages_are_recognised(message):
    from engine.vllm_client import _says_too_long

    assert _says_too_long(message)
    assert not _says_too_long("engine core died unexpectedly")


def test_burst_of_seeded_long_prompts_does_not_kill_the_engine(tiny_engine_url):
    # With chunked prefill, vLLM 0.32's CPU runner dies on seeded requests whose prefill is split
    # ("CPU Generator does not use offset"); the embedded engine turns chunking off on the CPU.
    import random

    import httpx

    rng = random.Random(0)

    async def one(client, i):
        words = " ".join(rng.choice(["gravity", "plants", "cheese"]) for _ in range(120))
        r = await client.post(
            tiny_engine_url + "/v1/chat/completions",
            json={
                "model": "policy",
                "messages": [{"role": "user", "content": words}],
                "n": 2,
                "seed": i,
                "max_tokens": 8,
                "temperature": 1.0,
            },
        )
        return r.status_code

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(burst()) == [200] * 64
    assert httpx.get(tiny_engine_url + "/health").status_code == 200


def _engine_answering(content) -> VLLMServerEngine:
    """An engine whose server answers every chat request with `content` (bytes, or a function
    making a fresh async iterator of them)."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content() if callable(content) else content)

    engine = VLLMServerEngine("http://engine.invalid", "policy", "v0000")
    engine._http = httpx.AsyncClient(
        base_url="http://engine.invalid", transport=httpx.MockTransport(answer)
    )
    return engine


def _one_pair(engine: VLLMServerEngine) -> list:
    """The updates of one seeded pair from `engine`, which is closed after."""

    async def run():
        try:
            return await complete(engine)
        finally:
            await engine.aclose()

    return asyncio.run(run())


def _engine_streaming(events: list[str]) -> VLLMServerEngine:
    """An engine whose server answers every chat request with these server-sent events."""
    return _engine_answering("".join(f"data: {event}\n\n" for event in events).encode())


@pytest.mark.parametrize(
    "events",
    [
        ['{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}', '{"choices": [{"inde'],
        ['{"choices": [{"index": 5, "delta": {"content": "Hi"}}]}'],
        ['{"choices": [{"delta": {"content": "Hi"}}]}'],
        ["[1, 2]"],
    ],
    ids=["cut-json", "unknown-index", "no-index", "not-an-object"],
)
def test_a_malformed_reply_stream_is_an_engine_error_not_a_crash(events):
    """A chunk the client cannot read is the engine's fault: the user gets the engine's 502 and
    its message, not a 500 from a KeyError or a JSON error deep in the stream."""

    with pytest.raises(EngineError) as raised:
        _one_pair(_engine_streaming(events))
    assert type(raised.value) is EngineError
    assert raised.value.status == 502


def test_reply_text_with_unicode_line_separators_streams_whole():
    """vLLM writes reply text into its JSON unescaped; U+2028, U+0085 and U+2029 are line breaks
    to `str.splitlines` (and to httpx's `aiter_lines`) but not to an event stream. The replies
    arrive whole, also when the bytes come in pieces that cut those characters."""
    texts = ("one\u2028two", "three\x85four\u2029five")
    chunk = {
        "choices": [
            {"index": i, "delta": {"content": text}, "finish_reason": "stop"}
            for i, text in enumerate(texts)
        ]
    }
    body = f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\ndata: [DONE]\n\n".encode()

    async def pieces():
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    final = _one_pair(_engine_answering(pieces))[-1]
    assert final.final
    assert tuple(c.text for c in final.candidates) == texts
