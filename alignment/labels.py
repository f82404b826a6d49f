"""Human votes and AI labels: agreement, and the mixed preference set for the reward model."""

from __future__ import annotations


def agreement_rate(rows: list[dict]) -> tuple[float | None, int]:
    """Share of pairs with a decisive human vote (a/b) and an AI label where both agree.

    Returns (rate, number of pairs compared); rate is None when no pair has both.
    """
    both = [r for r in rows if r.get("human") in ("a", "b") and r.get("ai") in ("a", "b")]
    if not both:
        return None, 0
    return sum(r["human"] == r["ai"] for r in both) / len(both), len(both)


def weighted_ai_rows(rows: list[dict], weight: float) -> list[dict]:
    """AI-labeled rows to train on, with an expected multiplicity of `weight` per row.

    TRL's RewardTrainer has no per-example weights, so the weight is applied to the data: each
    row appears floor(weight) times, plus once more for a hash-chosen share (weight mod 1) of rows.
    0 leaves AI labels out; 1 counts them like human votes.
    """
    import hashlib

    whole, frac = int(weight), weight - int(weight)
    out = []
    for r in rows:
        extra = hashlib.sha256(str(r["pair_id"]).encode()).digest()[0] / 256 < frac
        out.extend([r] * (whole + int(extra)))
    return out
