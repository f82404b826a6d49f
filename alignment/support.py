"""What the reward models can vouch for: replies about as long as the ones people voted on.

The reward models learn from the replies users compared. When v0 never writes short replies,
no vote ever shows them that too short is bad, and they extrapolate whatever cue they learned
("shorter first sentence", "fewer long words") into replies shorter than anything voted on.
PPO finds that region, and the gate, asking the same models, cannot see the harm: measured on
SmolLM2 (`opening` seed 2 in bench/RESULTS.md), the gate saw a win rate of 0.94 while the
simulated user liked the new version no more than v0, its replies having shrunk from 50 to 30
words with 8 % under five (Gao et al. 2022's over-optimisation, seen against the true taste).

So the short end of the voted replies bounds what a score means (by default half the length
of their shortest 5 %): PPO's reward is lowered for a rollout shorter than that (like the
missing-EOS penalty), and the gate neither counts a comparison whose new reply is that short nor
deploys a version that writes many more such replies than the serving one. Length is the one
cheap feature every collapse seen so far moved along ("Honey.", "Magnum!"); other features would
join here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class ReplySupport:
    shortest: int  # tokens; a reply with fewer lies outside what the voted replies cover
    quantile: float  # of the voted replies' lengths that `shortest` is a fraction of
    replies: int  # voted replies it was measured on

    def bound(self, limit: int) -> int:
        """The bound for a sampler allowed `limit` new tokens: votes on longer replies (a chat
        allowing more tokens than PPO) do not make a reply that used all of them "short"."""
        return min(self.shortest, limit)

    def outside(self, lengths: Sequence[int], limit: int) -> list[bool]:
        """Which of these reply lengths (tokens) are too short for a sampler of `limit`."""
        bound = self.bound(limit)
        return [n < bound for n in lengths]

    def as_dict(self) -> dict:
        return asdict(self)


def token_counter(tokenizer) -> CountTokens:
    """A voted reply's length (stored as text) in the tokenizer's tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply_length(ids: Sequence[int], eos_id: int | None) -> int:
    """A sampled reply's length in tokens, its end token not counted (as in a voted one)."""
    return len(ids) - int(bool(ids) and ids[-1] == eos_id)


def voted_replies(records: Sequence[dict]) -> list[str]:
    """Both replies of every preference record (`alignment.labels`)."""
    return [m["content"] for r in records for side in ("chosen", "rejected") for m in r[side]]


def reply_support(
    records: Sequence[dict],
    count_tokens: CountTokens,
    quantile: float,
    fraction: float = 1.0,
    min_replies: int = 20,
) -> ReplySupport | None:
    """`fraction` of the `quantile` of the voted replies' lengths, or None (no bound) when it
    is disabled (quantile 0) or there are too few replies to place it.

    Not the quantile itself: a user who wants finished replies gets them by PPO shortening
    SmolLM2's (50 -> 30 words, bench/RESULTS.md), below most of the voted ones, which are cut
    off at the chat's token limit; the collapses seen were under half of v0's length. On
    SmolLM2 at 64 tokens the voted replies' 5 % quantile is about 41 tokens, so the bound is
    20 tokens, about 15 words."""
    lengths = sorted(count_tokens(text) for text in voted_replies(records))
    if quantile <= 0 or len(lengths) < min_replies:
        return None
    at_quantile = lengths[int(quantile * (len(lengths) - 1))]
    return ReplySupport(int(fraction * at_quantile), quantile, len(lengths))
