"""Constitutional AI with the serving model: critique-revision chains and AI preference labels.

Phase 1: for a chosen reply, sample a principle, ask the model to critique the reply against it,
then to revise it; repeat for `rounds`, each round revising the last revision. Every round is
stored (principle, critique, revision, model version, time).
Phase 2: an AI judge compares the two candidates of a pair under a sampled principle; the label's
confidence comes from the judge's next-token probabilities of "A" and "B", not a parsed guess.

The background worker never slows the chat: it only sends a request while no user turn is
generating, so its requests yield to user traffic; its backlog is reported by `backlog()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from alignment.constitution import (
    Constitution,
    critique_messages,
    judge_messages,
    parse_constitution,
    revision_messages,
)
from alignment.labels import agreement_rate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CritiqueRound:
    round: int
    principle: str
    critique: str
    revision: str


@dataclass(frozen=True)
class AILabel:
    choice: str  # 'a' or 'b'
    principle: str
    confidence: float  # P(choice) / (P(A) + P(B)); 0.5 when the judge put no mass on either
    p_a: float
    p_b: float


def label_from_probabilities(p_a: float, p_b: float, principle: str) -> AILabel:
    total = p_a + p_b
    share_a = p_a / total if total > 0 else 0.5
    choice = "a" if share_a >= 0.5 else "b"
    return AILabel(choice, principle, max(share_a, 1 - share_a), p_a, p_b)


class Critic:
    def __init__(
        self,
        engine,
        constitution: Constitution,
        *,
        rounds: int = 1,
        max_new_tokens: int = 128,
        seed: int = 0,
    ) -> None:
        self.engine = engine
        self.constitution = constitution
        self.rounds = rounds
        self.sampling = {"temperature": 0.7, "max_tokens": max_new_tokens}
        self.rng = random.Random(seed)

    async def critique_chain(self, prompt: list[dict[str, str]], reply: str) -> list[CritiqueRound]:
        chain, current = [], reply
        for r in range(1, self.rounds + 1):
            principle = self.constitution.sample(self.rng)
            seed = self.rng.randrange(2**31)
            critique = await self.engine.complete(
                critique_messages(prompt, current, principle), self.sampling, seed
            )
            revision = await self.engine.complete(
                revision_messages(prompt, current, principle, critique), self.sampling, seed + 1
            )
            chain.append(CritiqueRound(r, principle.id, critique, revision))
            current = revision or current
        return chain

    async def judge(self, prompt: list[dict[str, str]], reply_a: str, reply_b: str) -> AILabel:
        principle = self.constitution.sample(self.rng)
        probs = await self.engine.option_probabilities(
            judge_messages(prompt, reply_a, reply_b, principle), ("A", "B")
        )
        return label_from_probabilities(probs["A"], probs["B"], principle.id)


class CAIWorker:
    """Works through the critique and judging backlog whenever the chat is idle."""

    def __init__(
        self,
        critic: Critic,
        store,
        service,
        *,
        idle_poll_s: float = 1.0,
        cycle_running: Callable[[], bool] = lambda: False,
        max_attempts: int = 3,
    ) -> None:
        self.critic = critic
        self.store = store
        self.service = service
        self.idle_poll_s = idle_poll_s
        # While a retrain cycle trains, its rollouts and gate need the engine and the cores;
        # on a 2-core box the critique stream took half the engine and left the cycle's worker
        # about 0.45 of a core. Critiques wait for the cycle to end.
        self.cycle_running = cycle_running
        # The queue is oldest first: an item that always fails would block all others. After
        # `max_attempts` failures it is skipped, with the reason recorded (`cai_skips`).
        self.max_attempts = max_attempts
        self._failures: dict[str, int] = {}

    @property
    def constitution(self) -> Constitution:
        return self.critic.constitution

    async def replace_constitution(self, body: object) -> int:
        """Validate and store an edited constitution as a new version; use it from now on."""
        constitution = parse_constitution(body, "constitution")
        version = await asyncio.to_thread(
            self.store.save_constitution, constitution.name, constitution.as_json()
        )
        self.critic.constitution = constitution
        return version

    async def chain(self, candidate_id: str) -> list[dict]:
        rows = await asyncio.to_thread(self.store.critique_chain, candidate_id)
        for r in rows:
            r["created_at"] = r["created_at"].isoformat()
        return rows

    async def recent(self, limit: int = 50) -> list[dict]:
        return await asyncio.to_thread(self.store.critiqued_candidates, limit)

    async def agreement(self) -> dict:
        rows = await asyncio.to_thread(self.store.label_pairs)
        rate, n = agreement_rate(rows)
        return {"agreement_rate": rate, "pairs_compared": n}

    async def backlog(self) -> dict:
        return await asyncio.to_thread(self.store.cai_backlog)

    async def work_once(self) -> bool:
        """Do one item of work if any; returns whether there was work."""
        version = self.service.model_version
        todo = await asyncio.to_thread(self.store.candidates_to_critique, 1)
        if todo:
            item = todo[0]
            async with self._attempt(item["candidate_id"], "critique"):
                for r in await self.critic.critique_chain(item["prompt"], item["text"]):
                    await asyncio.to_thread(
                        self.store.record_critique_round,
                        item["candidate_id"],
                        r.round,
                        r.principle,
                        r.critique,
                        r.revision,
                        version,
                    )
            return True
        pairs = await asyncio.to_thread(self.store.pairs_to_judge, 1)
        if pairs:
            p = pairs[0]
            async with self._attempt(p["pair_id"], "judge"):
                label = await self.critic.judge(p["prompt"], p["text_a"], p["text_b"])
                await asyncio.to_thread(
                    self.store.record_ai_label,
                    p["pair_id"],
                    label.choice,
                    label.principle,
                    label.confidence,
                    label.p_a,
                    label.p_b,
                    version,
                )
            return True
        return False

    @contextlib.asynccontextmanager
    async def _attempt(self, item_id: str, kind: str):
        """Count a failure of this item; past `max_attempts`, skip it instead of re-raising."""
        try:
            yield
        except Exception as exc:
            n = self._failures[item_id] = self._failures.get(item_id, 0) + 1
            if n < self.max_attempts:
                raise
            log.warning("constitutional AI: giving up on %s %s after %d tries", kind, item_id, n)
            await asyncio.to_thread(self.store.record_cai_skip, item_id, kind, repr(exc), n)
            self._failures.pop(item_id, None)
        else:
            self._failures.pop(item_id, None)

    async def run_forever(self) -> None:
        while True:
            if self.service.generating > 0 or self.cycle_running():  # users and cycles first
                await asyncio.sleep(self.idle_poll_s)
                continue
            try:
                worked = await self.work_once()
            except Exception:  # noqa: BLE001 - keep the worker alive; the item is retried
                log.exception("constitutional AI work item failed")
                worked = False
            if not worked:
                await asyncio.sleep(self.idle_poll_s * 5)
