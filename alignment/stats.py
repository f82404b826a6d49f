"""Intervals for win rates from pairwise comparisons: one home for the arithmetic that the gate,
and anything else that counts wins, decides on."""

from __future__ import annotations

import math


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % at z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is honest at small n, which is
    where a cycle's gate lives (a few dozen comparisons). n = 0 gives the vacuous (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def format_interval(bounds: list[float] | tuple[float, float] | None) -> str:
    """'[0.55, 0.82]', or '' when there is none (older versions, a refused cycle)."""
    return f"[{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else ""
