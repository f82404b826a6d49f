"""The users' verdict on a challenger: counting canary votes, the interval, the decision.

Pure functions over vote rows, no I/O: `assistant.canary_service` owns the running canary (the
engine adapter, the store, the swap) and asks these what the votes say.

A canary pair shows one reply from the serving version and one from the challenger. A vote for
the challenger's reply is a win, for the serving one a loss, a tie half of each; "both bad" says
nothing about which is better and is left out (as Chatbot Arena leaves out both-bad votes).
The challenger's win rate gets a 95 % **Wilson score interval** (Wilson 1927), which stays
inside [0, 1] and keeps its coverage at the small counts a canary decides on, where the normal
approximation does not.

Decision rule (a documented choice; the defaults come from `CanaryConfig`):
- promote when at least `min_votes` comparisons are in and the interval's lower bound is > 0.5;
- retire as soon as the upper bound is < 0.5 (no minimum: a challenger the users clearly dislike
  should stop reaching them quickly; with no ties that is after 4 straight losses);
- at `max_votes` comparisons with neither, retire: the challenger has not been shown better, and
  the serving version, which people already accepted, keeps all traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from alignment.stats import wilson_interval


@dataclass(frozen=True)
class CanaryVotes:
    """Votes on canary pairs, by which version's reply was chosen."""

    challenger: int = 0
    serving: int = 0
    tie: int = 0
    both_bad: int = 0

    @property
    def comparisons(self) -> int:
        """The votes that count toward the win rate (both-bad votes do not)."""
        return self.challenger + self.serving + self.tie

    @property
    def win_rate(self) -> float | None:
        n = self.comparisons
        return (self.challenger + 0.5 * self.tie) / n if n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.challenger + 0.5 * self.tie, self.comparisons)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_canary_votes(rows: list[dict], challenger: str, serving: str) -> CanaryVotes:
    """Tally votes on pairs with one candidate from each version. Each row has `choice` and the
    versions of candidates `a` and `b` (`version_a`, `version_b`); other pairs are skipped."""
    counts = {"challenger": 0, "serving": 0, "tie": 0, "both_bad": 0}
    for row in rows:
        versions = {"a": row["version_a"], "b": row["version_b"]}
        if set(versions.values()) != {challenger, serving}:
            continue
        choice = row["choice"]
        if choice in ("tie", "both_bad"):
            counts[choice] += 1
        else:
            counts["challenger" if versions[choice] == challenger else "serving"] += 1
    return CanaryVotes(**counts)


@dataclass(frozen=True)
class CanaryDecision:
    decision: str | None  # "promoted" | "retired" | None (keep running)
    reason: str


def decide(votes: CanaryVotes, min_votes: int, max_votes: int) -> CanaryDecision:
    """What the users' votes say about the challenger so far (see the module's rule)."""
    n = votes.comparisons
    if n == 0:
        return CanaryDecision(None, "no canary votes yet")
    lo, hi = votes.interval
    said = (
        f"the challenger won {votes.win_rate:.0%} of {n} comparisons "
        f"(95% interval {lo:.2f}-{hi:.2f})"
    )
    if hi < 0.5:
        return CanaryDecision("retired", f"{said}: the users prefer the serving version")
    if lo > 0.5 and n >= min_votes:
        return CanaryDecision("promoted", f"{said}: the users prefer the challenger")
    if max_votes and n >= max_votes:
        return CanaryDecision(
            "retired", f"{said} after the {max_votes}-vote cap: not shown better, serving stays"
        )
    if lo > 0.5:
        return CanaryDecision(None, f"{said}; promotion waits for {min_votes} comparisons")
    return CanaryDecision(None, f"{said}; not decided yet")
