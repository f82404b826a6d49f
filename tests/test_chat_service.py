"""The chat service's own rules, in-process and fast: admission control, the per-address backlog
share, vote limits, vote pacing and the order of checks. A fake engine stands in for vLLM (its
generation is held open by the test); the store is a real DuckDB file.
"""

from __future__ import annotations

import asyncio

import pytest

from assistant.chat_service import BusyError, ChatService, RateLimitError
from assistant.config import SamplingConfig, ServeConfig
from engine.protocol import CandidateDraft, PairProgress
from storage import ConflictError, InvalidInputError, NotFoundError, Store
from tests import store_reads


class HeldEngine:
    """Streams a pair only once `release` is set, so a test can hold turns in flight."""

    model_version = "v0000"
    base_url = "fake://engine"

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def stream_pair(self, messages, sampling, seed, challenger=None, per_candidate=None):
        drafts = (CandidateDraft(0, seed, "one two"), CandidateDraft(1, seed + 1, "three"))
        yield PairProgress(drafts, self.model_version)
        await self.release.wait()
        for d in drafts:
            d.finish_reason, d.completion_tokens, d.latency_ms = "stop", 2, 1.0
        yield PairProgress(drafts, self.model_version, 5, final=True, sampling=sampling)

    async def healthy(self) -> bool:
        return True


def service(tmp_path, **serve) -> tuple[ChatService, HeldEngine, Store]:
    store, engine = Store(tmp_path / "db.duckdb"), HeldEngine()
    config = ServeConfig(reading_words_per_second=0, **serve)
    return ChatService(store, engine, SamplingConfig(), config), engine, store


def test_backlog_is_shared_between_addresses_then_full(tmp_path):
    chat, engine, store = service(tmp_path, max_backlog=4, max_backlog_share=0.5)

    async def run():
        turns = [asyncio.create_task(chat.chat(None, "hi", client=c)) for c in ("x", "x")]
        await asyncio.sleep(0.01)
        with pytest.raises(RateLimitError, match="this address already has 2 replies"):
            await chat.chat(None, "one more", client="x")
        turns += [asyncio.create_task(chat.chat(None, "hi", client="y")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert chat.generating == 4
        with pytest.raises(BusyError, match="busy: 4 replies"):
            await chat.chat(None, "full", client="z")
        engine.release.set()
        done = await asyncio.gather(*turns)
        assert chat.generating == 0 and not chat._generating_by_client  # nothing left counted
        return done

    assert len(asyncio.run(run())) == 4
    store.close()


def test_vote_limits_and_the_order_of_checks(tmp_path):
    chat, engine, store = service(
        tmp_path,
        max_votes_per_minute=2,
        max_votes_per_minute_per_address=3,
        max_votes_per_minute_total=0,
    )
    engine.release.set()

    async def run():
        pairs = [(await chat.chat(None, f"q{i}")).pair_id for i in range(5)]
        # an unknown pair is refused before any allowance is spent
        for _ in range(5):
            with pytest.raises(NotFoundError):
                await chat.vote("nope", "a", session_id="s1", client="x")
        await chat.vote(pairs[0], "a", session_id="s1", client="x")
        await chat.vote(pairs[1], "a", session_id="s1", client="x")
        with pytest.raises(RateLimitError, match="this session: at most 2"):
            await chat.vote(pairs[2], "a", session_id="s1", client="x")
        await chat.vote(pairs[2], "a", session_id="s2", client="x")
        with pytest.raises(RateLimitError, match="this address: at most 3"):
            await chat.vote(pairs[3], "a", session_id="s3", client="x")
        stored = await chat.vote(pairs[3], "b", session_id="s3", client="elsewhere")
        assert stored.continued_with == "three"

    asyncio.run(run())
    store.close()


def test_a_vote_faster_than_reading_is_kept_but_flagged(tmp_path):
    chat, engine, store = service(tmp_path)
    chat.serve.reading_words_per_second = 15.0
    engine.release.set()

    async def run():
        turn = await chat.chat(None, "hi")
        return await chat.vote(turn.pair_id, "a")

    vote = asyncio.run(run())
    assert vote.flagged.startswith("voted ") and "reading 3 words" in vote.flagged
    assert store.voted_pairs() == []  # left out of training and export
    store.close()


def test_a_written_reply_continues_the_conversation_and_feeds_sft(tmp_path):
    """Both replies bad, the user writes the one they wanted: it is stored as a demonstration
    of that pair (a both-bad vote), continues the conversation in their words, counts against
    the vote limits, and reaches the SFT stage's examples and the `sft` export."""
    chat, engine, store = service(tmp_path, max_votes_per_minute=1)
    engine.release.set()

    async def run():
        first = await chat.chat(None, "hi", session_id="s")
        with pytest.raises(InvalidInputError, match="'text' is empty"):
            await chat.demonstrate(first.pair_id, "  ", session_id="s")
        wrote = await chat.demonstrate(first.pair_id, "Hello! How can I help?", session_id="s")
        with pytest.raises(ConflictError, match="already has a vote"):
            await chat.vote(first.pair_id, "a", session_id="s")
        second = await chat.chat(first.conversation_id, "thanks", session_id="s")
        with pytest.raises(RateLimitError):  # one vote or demonstration a minute here
            await chat.demonstrate(second.pair_id, "You're welcome.", session_id="s")
        exported = [r async for r in chat.preference_data("sft")]
        return wrote, second, exported

    wrote, second, exported = asyncio.run(run())
    assert wrote.choice == "both_bad" and wrote.continued_with == "Hello! How can I help?"
    assert wrote.demonstration_id and "demonstration_id" in wrote.as_dict()
    prompt = store_reads.pair(store, second.pair_id)["prompt"]
    assert prompt[-2:] == [
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "thanks"},
    ]
    assert store.demonstrations() == [
        {"prompt": [{"role": "user", "content": "hi"}], "text": "Hello! How can I help?"}
    ]
    assert exported == [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
            ]
        }
    ]
    from alignment.sft import sft_records

    examples = [
        {"prompt": [{"role": "user", "content": "q"}], "revision": "AI rewrite", "source": "ai"},
        {"prompt": [{"role": "user", "content": "hi"}], "revision": "mine", "source": "human"},
    ]
    records = sft_records(examples, demonstration_weight=3)
    assert [r["completion"][0]["content"] for r in records] == ["AI rewrite"] + ["mine"] * 3
    store.close()
