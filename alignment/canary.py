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

Beside the raw win rate the canary shows the **style-controlled** one
(`alignment.style_control`: a Bradley-Terry fit with the replies' length and markdown as
covariates, on the same counted votes): what the challenger wins at equal length and markdown.
It is shown, and written into the verdict's reason, but not decided on: the rule above stays on
the raw votes, which are what the users said; a gain that disappears under style control is
reported as such (`style_note`), for the admin to weigh.

No one session or address decides it: the comparisons count as `alignment.sources` caps them
(at most `max_share` of the counted ones from one source, its earliest first), so four losses
from one voter alone retire nothing where the app serves many.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from alignment.sources import cap_source_share
from alignment.stats import wilson_interval
from alignment.style_control import PairJudgement, judge


@dataclass(frozen=True)
class CanaryVotes:
    """Votes on canary pairs, by which version's reply was chosen."""

    challenger: int = 0
    serving: int = 0
    tie: int = 0
    both_bad: int = 0
    over_share: int = 0  # comparisons not counted: their session or address had its share

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


def counted_canary_rows(
    rows: list[dict], challenger: str, serving: str, max_share: float = 1.0
) -> tuple[list[dict], int, int]:
    """The votes that count toward the verdict (one from each version, not both-bad, within
    each source's share), with how many were both-bad and how many over a source's share."""
    ours = [r for r in rows if {r["version_a"], r["version_b"]} == {challenger, serving}]
    compared = [r for r in ours if r["choice"] != "both_bad"]
    counted = cap_source_share(compared, max_share)
    return counted, len(ours) - len(compared), len(compared) - len(counted)


def count_canary_votes(
    rows: list[dict], challenger: str, serving: str, max_share: float = 1.0
) -> CanaryVotes:
    """Tally votes on pairs with one candidate from each version, oldest first. Each row has
    `choice`, the versions of candidates `a` and `b` (`version_a`, `version_b`) and, to cap
    one source's share of the comparisons, `session_id` and `client`; other pairs are skipped."""
    counted, both_bad, over_share = counted_canary_rows(rows, challenger, serving, max_share)
    counts = {"challenger": 0, "serving": 0, "tie": 0}
    for row in counted:
        choice = row["choice"]
        if choice == "tie":
            counts["tie"] += 1
        else:
            winner = row["version_a"] if choice == "a" else row["version_b"]
            counts["challenger" if winner == challenger else "serving"] += 1
    return CanaryVotes(**counts, both_bad=both_bad, over_share=over_share)


def style_controlled(
    rows: list[dict], challenger: str, serving: str, max_share: float = 1.0
) -> PairJudgement | None:
    """The challenger's raw and style-controlled win rate over the votes that count (as
    `count_canary_votes` counts them; rows need `text_a`/`text_b` as well), or None before any.
    Shown beside the verdict, never decided on."""
    counted, _, _ = counted_canary_rows(rows, challenger, serving, max_share)
    return judge(counted, challenger, serving) if counted else None


def with_style(reason: str, judged: PairJudgement | None) -> str:
    """A verdict's reason with what style control says of the same votes, for the record."""
    if judged is None:
        return reason
    if judged.note:
        return f"{reason}; {judged.note}"
    lo, hi = judged.interval_style_controlled
    return (
        f"{reason}; at equal length and markdown {judged.win_rate_style_controlled:.0%} "
        f"(95% interval {lo:.2f}-{hi:.2f})"
    )


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
    if votes.over_share:
        said += f" ({votes.over_share} more not counted: over one voter's share)"
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
