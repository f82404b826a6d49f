"""A promotion is one observable step: the engine's new weights, the store's serving version and
the canary's verdict change together, before any reply can be labelled with the new version.

The engine here is the real `VLLMServerEngine` over an in-process stand-in for vLLM's HTTP
routes (httpx's mock transport), so the test can hold the swap open exactly where a slow disk or
a large model would, and ask for a pair meanwhile; the store is a real DuckDB file. (The
real-engine swap is covered by tests/test_engine.py; the full canary by tests/test_canary.py.)
"""

from __future__ import annotations

import asyncio
import json

import httpx

from alignment.config import CanaryConfig
from assistant.canary_service import CanaryService
from engine.vllm_client import VLLMServerEngine
from storage import Store


def _sse(chunks: list[dict]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _pair_chunks() -> list[dict]:
    return [
        {"choices": [{"index": i, "delta": {"content": "hi"}, "token_ids": [1]}]} for i in (0, 1)
    ] + [{"choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]} for i in (0, 1)]


class StandInVLLM:
    """vLLM's routes the swap uses; `reload_weights` blocks until the test lets it go on."""

    def __init__(self) -> None:
        self.reloading = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/collective_rpc":
            self.reloading.set()
            await self.release.wait()
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, content=_sse(_pair_chunks()))
        return httpx.Response(200, json={})


def _engine(stand_in: StandInVLLM) -> VLLMServerEngine:
    engine = VLLMServerEngine("http://engine", "policy", "v0000")
    engine._http = httpx.AsyncClient(
        base_url="http://engine", transport=httpx.MockTransport(stand_in)
    )
    return engine


def test_a_reply_named_after_the_promoted_version_comes_after_its_record(tmp_path):
    store = Store(tmp_path / "db" / "app.duckdb")
    store.ensure_base_version("v0000", str(tmp_path / "base"), {})
    (tmp_path / "v0001").mkdir()
    (tmp_path / "adapter").mkdir()
    store.start_canary(
        "v0001", "v0000", str(tmp_path / "adapter"), 1.0, {"path": str(tmp_path / "v0001")}
    )
    seen: dict = {}

    async def run() -> None:
        stand_in = StandInVLLM()
        engine = _engine(stand_in)
        canary = CanaryService(store, engine, CanaryConfig(), asyncio.Lock(), seed=1)
        await canary.resume()  # loads the challenger's adapter, as at app start
        assert canary.running
        promotion = asyncio.create_task(canary.finish("promoted", "users said better"))
        await stand_in.reloading.wait()  # the engine is mid-swap: a user asks for a pair now

        async def one_pair() -> None:
            async for progress in engine.stream_pair([{"role": "user", "content": "hi"}], {}, 7):
                if progress.final:
                    # the moment a reply can carry the new version, the app says it serves
                    seen["version"] = progress.model_version
                    seen["canary"] = store.latest_canary()["decision"]
                    seen["serving"] = store.serving_version()["version"]
                    seen["canary_service"] = (await canary.status())["decision"]

        pair = asyncio.create_task(one_pair())
        await asyncio.sleep(0.05)
        assert not pair.done()  # held at the gate while the weights change
        stand_in.release.set()
        await asyncio.gather(promotion, pair)
        await engine.aclose()

    try:
        asyncio.run(run())
    finally:
        store.close()
    assert seen == {
        "version": "v0001",
        "canary": "promoted",
        "serving": "v0001",
        "canary_service": "promoted",
    }


def test_a_promotion_records_the_serving_version_and_the_verdict_in_one_transaction(tmp_path):
    from storage.canaries import CanaryEnd

    store = Store(tmp_path / "db" / "app.duckdb")
    try:
        store.ensure_base_version("v0000", "/base", {})
        store.start_canary("v0001", "v0000", "/adapter", 0.5, {"path": "/v0001"})
        canary_id = store.running_canary()["id"]
        store.set_serving("v0001", 0.5, CanaryEnd(canary_id, "promoted", "users said better"))
        assert store.serving_version()["version"] == "v0001"
        assert store.model_version("v0000")["status"] == "previous"
        ended = store.latest_canary()
        assert ended["decision"] == "promoted" and ended["reason"] == "users said better"
        assert store.running_canary() is None
    finally:
        store.close()
