"""The running canary: a challenger version answers one side of a share of pairs until the
users' votes promote it to serve everybody or retire it.

The challenger is the cycle's PPO adapter, loaded in the same engine as a LoRA adapter on the
serving weights (the engine runs with LoRA enabled for on-policy rollouts anyway), so a canary
pair is two requests, one per version, generated concurrently; nothing is merged or copied
until the users have spoken. Promotion is the ordinary hot swap to the challenger's merged
checkpoint. One challenger at a time; the retrain loop refuses cycles while it runs.

State lives in the store (`canaries` table), so a restarted app resumes the canary (reloading
the adapter) or, when that is impossible, records it as interrupted and keeps serving as is.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime, timezone
from pathlib import Path

from alignment.canary import (
    CanaryDecision,
    CanaryVotes,
    count_canary_votes,
    decide,
    style_controlled,
    with_style,
)
from alignment.config import CanaryConfig
from alignment.serving import serve_version
from engine.protocol import Challenger, EngineError
from storage import ConflictError
from storage.canaries import CanaryEnd

log = logging.getLogger(__name__)


class CanaryService:
    def __init__(
        self,
        store,
        engine,
        config: CanaryConfig,
        lock: asyncio.Lock,
        seed: int | None = None,
        max_source_share: float = 1.0,
    ) -> None:
        self.store = store
        self.engine = engine
        self.config = config
        # the most of the comparisons one session or address counts for (alignment.sources)
        self.max_source_share = max_source_share
        self.lock = lock  # the retrain loop's: swaps, cycles and canary decisions never overlap
        self.decides = True  # False on an app process that does not lead (`assistant.leadership`)
        self.current: dict | None = None  # the running canary's row
        self._rng = random.Random(seed)
        self._concluding: asyncio.Task | None = None
        self.after_promotion = None  # e.g. the loop's --keep-versions pruning

    @property
    def running(self) -> bool:
        return self.current is not None

    @property
    def challenger_version(self) -> str | None:
        return self.current["challenger"] if self.current is not None else None

    # --- life cycle -----------------------------------------------------------------------

    async def start(self, version: str, parent: str, adapter: str, manifest: dict) -> None:
        """Load the challenger's adapter and record the canary; raises EngineError when the
        engine cannot serve adapters (the caller then deploys at the gate)."""
        await self.engine.load_adapter(version, adapter)
        await asyncio.to_thread(
            self.store.start_canary, version, parent, adapter, self.config.share, manifest
        )
        self.current = await asyncio.to_thread(self.store.running_canary)

    async def resume(self) -> None:
        """At app start (and after an engine restart): reload the running canary's adapter, or
        record it as interrupted, serving untouched."""
        row = await asyncio.to_thread(self.store.running_canary)
        if row is None:
            self.current = None
            return
        serving = await asyncio.to_thread(self.store.serving_version)
        problem = None
        if serving is None or serving["version"] != row["serving"]:
            problem = "the serving version changed"
        elif not Path(row["adapter"]).is_dir():
            problem = "its adapter is no longer on disk"
        else:
            try:
                await self.engine.load_adapter(row["challenger"], row["adapter"])
            except EngineError as exc:
                problem = str(exc)
        if problem is None:
            self.current = row
            return
        self.current = None
        await asyncio.to_thread(
            self.store.finish_canary,
            row["id"],
            "interrupted",
            f"interrupted: {problem}; {row['serving']} kept serving",
        )
        log.warning("canary of %s interrupted: %s", row["challenger"], problem)

    def pick(self) -> Challenger | None:
        """For a new turn: the challenger and its slot on a `share` of turns, else None."""
        c = self.current
        if c is None or self.engine.model_version != c["serving"]:
            return None
        if self._rng.random() >= c["share"]:
            return None
        return Challenger(c["challenger"], self._rng.randrange(2))

    async def adopt(self) -> None:
        """On an app process that does not lead: take the canary the leader runs (or ended)
        from the store, its adapter loaded here too (a shared engine has it already: loading
        it again is a no-op), so this process's turns give users its pairs as well."""
        row = await asyncio.to_thread(self.store.running_canary)
        if row is None:
            self.current = None
            return
        if self.current is not None and self.current["id"] == row["id"]:
            return
        try:
            await self.engine.load_adapter(row["challenger"], row["adapter"])
        except EngineError as exc:
            log.warning("canary of %s: its adapter does not load here: %s", row["challenger"], exc)
            return
        self.current = row

    async def check(self) -> None:
        """On the leading process, every few seconds: decide on the votes every process cast
        (a vote cast on another process does not call `vote_cast` here)."""
        c = self.current
        if c is not None:
            await self.vote_cast({"a": c["challenger"], "b": c["serving"]})

    async def vote_cast(self, versions: dict[str, str]) -> None:
        """After a vote on a pair with these versions: decide when the votes allow. The swap
        (or retirement) runs in the background; the vote's answer does not wait for it. Only
        the leading process decides (`decides`); the others leave it to its `check`."""
        c = self.current
        if (
            not self.decides
            or c is None
            or set(versions.values())
            != {
                c["challenger"],
                c["serving"],
            }
        ):
            return
        rows = await self._rows(c)
        votes = count_canary_votes(rows, c["challenger"], c["serving"], self.max_source_share)
        verdict = decide(votes, self.config.min_votes, self.config.max_votes)
        decided_at = datetime.now(timezone.utc)  # the verdict stands on the votes until now
        if verdict.decision is not None and self._concluding is None:
            # recorded with what style control says of the same votes (shown, not decided on)
            judged = style_controlled(rows, c["challenger"], c["serving"], self.max_source_share)
            verdict = CanaryDecision(verdict.decision, with_style(verdict.reason, judged))
            self._concluding = asyncio.create_task(self._conclude(verdict, decided_at))

    async def _conclude(self, verdict: CanaryDecision, decided_at: datetime) -> None:
        try:
            async with self.lock:
                await self.finish(verdict.decision, verdict.reason, decided_at)
        except Exception:  # noqa: BLE001 - the canary keeps running; an admin can decide
            log.exception("concluding the canary failed")
        finally:
            self._concluding = None

    async def promote(self) -> dict:
        """An admin promotes the challenger now, whatever the votes say so far."""
        self._require_leading()
        async with self.lock:
            votes = await self._require_running()
            await self.finish("promoted", f"promoted by an admin after {votes.comparisons} votes")
        return await self.status()

    async def retire(self) -> dict:
        self._require_leading()
        async with self.lock:
            votes = await self._require_running()
            await self.finish("retired", f"retired by an admin after {votes.comparisons} votes")
        return await self.status()

    def _require_leading(self) -> None:
        if not self.decides:
            raise ConflictError(
                "this app process does not lead: the canary is decided on the leading one "
                "(GET /api/health names it); send this there"
            )

    async def _require_running(self) -> CanaryVotes:
        if self.current is None:
            raise ConflictError("no canary is running")
        return await self.votes()

    async def finish(self, decision: str, reason: str, decided_at: datetime | None = None) -> None:
        """End the running canary (the caller holds the lock). Promotion swaps the challenger's
        merged weights in for everybody; either way its adapter is unloaded. The verdict is
        recorded as of `decided_at` (now by default): later votes on its pairs do not count."""
        c = self.current
        if c is None:
            return
        ending = CanaryEnd(c["id"], decision, reason, decided_at or datetime.now(timezone.utc))

        def stop_pairs() -> None:
            self.current = None  # no new canary pairs from here

        if decision == "promoted":
            # the swap, the serving record and the verdict are one step: no reply names the
            # challenger as serving while /api/canary still says the canary runs
            await serve_version(self.store, self.engine, c["challenger"], ending, stop_pairs)
        else:
            stop_pairs()
            await asyncio.to_thread(
                self.store.finish_canary, c["id"], decision, reason, ending.decided_at
            )
        await self.engine.unload_adapter(c["challenger"])
        if decision == "promoted" and self.after_promotion is not None:
            await self.after_promotion()
        log.warning("canary: %s %s (%s)", c["challenger"], decision, reason)

    # --- what the users said ----------------------------------------------------------------

    async def _rows(self, row: dict) -> list[dict]:
        # a decided canary's verdict stands on the votes cast until the decision (votes on its
        # pairs that came later are ordinary votes: they train and rate, they do not re-decide)
        return await asyncio.to_thread(
            self.store.cross_version_votes,
            (row["challenger"], row["serving"]),
            row.get("decided_at"),
        )

    async def votes(self, row: dict | None = None) -> CanaryVotes:
        row = row or self.current
        if row is None:
            return CanaryVotes()
        rows = await self._rows(row)
        return count_canary_votes(rows, row["challenger"], row["serving"], self.max_source_share)

    async def status(self) -> dict:
        """`GET /api/canary`: the running canary, else the last one, else all fields empty.
        Beside the raw `win_rate`, `win_rate_style_controlled` (and its interval, the style
        coefficients and `style_note`): the challenger's win rate at equal reply length and
        markdown (`alignment.style_control`), over the same counted votes. It is shown, not
        decided on: the decision rule stays on the raw votes (`alignment.canary`)."""
        row = self.current or await asyncio.to_thread(self.store.latest_canary)
        if row is None:
            return {
                "challenger": None,
                "serving": self.engine.model_version,
                "share": self.config.share,
                "votes": CanaryVotes().as_dict(),
                "win_rate": None,
                "interval": None,
                "decision": None,
                "reason": None,
                "min_votes": self.config.min_votes,
                "max_votes": self.config.max_votes,
                **_style_fields(None),
            }
        rows = await self._rows(row)
        votes = count_canary_votes(rows, row["challenger"], row["serving"], self.max_source_share)
        judged = await asyncio.to_thread(  # a small fit, off the event loop: pages poll this
            style_controlled, rows, row["challenger"], row["serving"], self.max_source_share
        )
        running = row["decision"] == "running"
        reason = (
            decide(votes, self.config.min_votes, self.config.max_votes).reason
            if running
            else row["reason"]
        )
        lo, hi = votes.interval
        return {
            "challenger": row["challenger"],
            "serving": row["serving"],
            "share": row["share"],
            "votes": votes.as_dict(),
            "win_rate": None if votes.win_rate is None else round(votes.win_rate, 4),
            "interval": [round(lo, 4), round(hi, 4)] if votes.comparisons else None,
            "decision": row["decision"],
            "reason": reason,
            "min_votes": self.config.min_votes,
            "max_votes": self.config.max_votes,
            **_style_fields(judged),
        }


def _style_fields(judged) -> dict:
    """The canary status's style-controlled fields (`alignment.canary.style_controlled`)."""
    if judged is None:
        return {
            "win_rate_style_controlled": None,
            "interval_style_controlled": None,
            "style_note": None,
            "style": None,
        }
    return {
        "win_rate_style_controlled": round(judged.win_rate_style_controlled, 4),
        "interval_style_controlled": [round(b, 4) for b in judged.interval_style_controlled],
        "style_note": judged.note,
        "style": judged.style,
    }
