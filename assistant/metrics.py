"""`GET /metrics`: the app in Prometheus' text format, and `GET /metrics/engine`: vLLM's own.

What an operator watches: turns, votes by choice, flagged votes, the backlog, answers by status
(429 and 503 among them), whether the engine is up, the serving and challenger versions, and the
retrain cycles by outcome with their seconds. The totals are read from the store when scraped
(one query) rather than counted in the request path, so they survive restarts and there is one
source of truth; only the answers' statuses are counted here, by a middleware. The embedded
engine listens on a private socket, so its own metrics (queue, KV cache, token throughput) are
passed through at `/metrics/engine`.

Both need the admin token (`Authorization: Bearer ...`, which Prometheus' scrape config sends
with `authorization: {credentials: ...}`): the figures say how the service is used.
"""

from __future__ import annotations

import asyncio
import collections

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ResponseCounts:
    """ASGI middleware: answers counted by HTTP status (a bounded set of keys)."""

    def __init__(self, app, by_status: collections.Counter[int]) -> None:
        self.app = app
        self.by_status = by_status  # shared with the app's collector

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.by_status[int(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class AppCollector(Collector):
    """The app's figures, read when Prometheus scrapes (on a worker thread: the store's query
    does not hold up the event loop)."""

    def __init__(self, store, service, canary, responses: collections.Counter[int]) -> None:
        self.store, self.service, self.canary, self.responses = store, service, canary, responses

    def collect(self):
        activity = self.store.activity()
        yield CounterMetricFamily(
            "assistant_turns", "user turns answered with a pair of replies", activity["turns"]
        )
        votes = CounterMetricFamily("assistant_votes", "votes cast, by choice", labels=["choice"])
        for choice in ("a", "b", "tie", "both_bad"):
            votes.add_metric([choice], activity["votes"].get(choice, 0))
        yield votes
        yield CounterMetricFamily(
            "assistant_votes_flagged",
            "votes kept but left out of training (cast faster than reading both replies)",
            activity["flagged"],
        )
        yield GaugeMetricFamily(
            "assistant_generating", "turns generating now (the backlog)", self.service.generating
        )
        yield GaugeMetricFamily(
            "assistant_backlog_limit", "turns that may generate at once (--max-backlog)",
            self.service.serve.max_backlog,
        )  # fmt: skip
        answers = CounterMetricFamily(
            "assistant_http_responses", "answers by HTTP status", labels=["status"]
        )
        for status, n in sorted(self.responses.items()):
            answers.add_metric([str(status)], n)
        yield answers
        yield GaugeMetricFamily(
            "assistant_engine_up",
            "1 while the engine serves (0 while the app restarts a dead one)",
            0 if self.service.engine_note else 1,
        )
        versions = InfoMetricFamily("assistant_version", "the versions answering users")
        versions.add_metric([], {"serving": self.service.model_version})
        running = self.canary.current if self.canary is not None else None
        versions.add_metric([], {"challenger": running["challenger"] if running else "none"})
        yield versions
        cycles = CounterMetricFamily(
            "assistant_cycles", "retrain cycles by how they ended", labels=["status"]
        )
        seconds = CounterMetricFamily(
            "assistant_cycle_seconds", "time spent in retrain cycles, by how they ended",
            labels=["status"],
        )  # fmt: skip
        for status, (n, total) in sorted(activity["cycles"].items()):
            cycles.add_metric([status], n)
            seconds.add_metric([status], total)
        yield cycles
        yield seconds


def build_metrics_router(registry: CollectorRegistry, engine, require_admin) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        require_admin(request)
        text = await asyncio.to_thread(generate_latest, registry)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @router.get("/metrics/engine", response_class=PlainTextResponse)
    async def engine_metrics(request: Request):
        require_admin(request)
        return PlainTextResponse(await engine.metrics(), media_type=CONTENT_TYPE)

    return router


def app_registry(store, service, canary, responses: collections.Counter[int]):
    """A registry of its own per app (tests build several in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(store, service, canary, responses))
    return registry
