"""Bradley-Terry ratings of versions from the users' votes on pairs that straddle two versions.

Every vote where the two candidates came from different versions (canary pairs, and pairs
generated across a swap) is one comparison: the chosen reply's version beats the other, a tie
is half a win each, "both bad" is left out. The ratings are the maximum-likelihood
Bradley-Terry strengths (Hunter 2004's MM iterations), on Chatbot Arena's Elo-like scale
(400 * log10 strength, anchored so the base version v0000, or the first version, is 1000),
with 95 % intervals from a bootstrap over votes, as Chatbot Arena computes them.

A version compared with no other gets no rating (None), rather than a made-up default.

Beside each rating, `style_controlled_scores` gives the same scale's score from the
style-controlled fit (`alignment.style_control`: Bradley-Terry with the replies' length and
markdown differences as covariates, LMArena's "style control"): the version's strength at equal
reply length and markdown, with a 95 % interval from the fit's curvature (Laplace), not a
bootstrap.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SCALE = 400 / math.log(10)
ANCHOR = 1000.0


@dataclass(frozen=True)
class Comparison:
    winner: str
    loser: str
    weight: float = 1.0  # 0.5 for each side of a tie


def comparisons(rows: list[dict]) -> list[Comparison]:
    """Comparisons from vote rows (`choice`, `version_a`, `version_b`) of cross-version pairs."""
    out: list[Comparison] = []
    for row in rows:
        a, b, choice = row["version_a"], row["version_b"], row["choice"]
        if a == b or choice == "both_bad":
            continue
        if choice == "tie":
            out += [Comparison(a, b, 0.5), Comparison(b, a, 0.5)]
        else:
            out.append(Comparison(a, b) if choice == "a" else Comparison(b, a))
    return out


def fit(items: list[Comparison], iterations: int = 200, prior: float = 0.5) -> dict[str, float]:
    """Bradley-Terry log-strengths by MM. `prior` adds that many virtual ties between every
    compared pair, which keeps a version that won (or lost) every vote finite."""
    versions = sorted({c.winner for c in items} | {c.loser for c in items})
    if len(versions) < 2:
        return {}
    wins = dict.fromkeys(versions, 0.0)
    games: dict[tuple[str, str], float] = {}
    for c in items:
        wins[c.winner] += c.weight
        key = tuple(sorted((c.winner, c.loser)))
        games[key] = games.get(key, 0.0) + c.weight
    for key in list(games):
        games[key] += prior
        for v in key:
            wins[v] += prior / 2
    strength = dict.fromkeys(versions, 1.0)
    for _ in range(iterations):
        new = {}
        for v in versions:
            denominator = sum(
                n / (strength[i] + strength[j]) for (i, j), n in games.items() if v in (i, j)
            )
            new[v] = wins[v] / denominator if denominator else strength[v]
        norm = math.exp(sum(math.log(s) for s in new.values()) / len(new))
        strength = {v: s / norm for v, s in new.items()}
    return {v: math.log(s) for v, s in strength.items()}


def ratings(rows: list[dict], bootstrap: int = 200, seed: int = 0) -> dict[str, dict]:
    """{version: {"score", "interval": [lo, hi], "votes"}} for every version in a cross-version
    vote; scores on the Elo-like scale, anchored at the earliest version (by name)."""
    items = comparisons(rows)
    point = fit(items)
    if not point:
        return {}
    anchor = min(point)
    votes: dict[str, int] = {}
    for row in rows:
        if row["version_a"] != row["version_b"] and row["choice"] != "both_bad":
            for v in (row["version_a"], row["version_b"]):
                votes[v] = votes.get(v, 0) + 1

    def scaled(logs: dict[str, float]) -> dict[str, float]:
        base = logs.get(anchor, 0.0)
        return {v: ANCHOR + SCALE * (x - base) for v, x in logs.items()}

    # resample votes (a tie's two halves travel together)
    units = [[c] for c in items if c.weight == 1.0]
    halves = [c for c in items if c.weight != 1.0]
    units += [halves[i : i + 2] for i in range(0, len(halves), 2)]
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {v: [] for v in point}
    for _ in range(bootstrap):
        drawn = [c for unit in rng.choices(units, k=len(units)) for c in unit]
        logs = fit(drawn, iterations=100)
        for v, s in scaled(logs).items():
            samples[v].append(s)
    out = {}
    for v, score in scaled(point).items():
        draws = sorted(samples[v])
        interval = (
            [draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]]
            if draws
            else [score, score]
        )
        out[v] = {
            "score": round(score, 1),
            "interval": [round(x, 1) for x in interval],
            "votes": votes.get(v, 0),
        }
    return out


def style_controlled_scores(rows: list[dict], anchor: str | None = None) -> dict[str, dict]:
    """{version: {"score_style_controlled", "interval_style_controlled": [lo, hi]}} on the
    ratings' scale, anchored at `anchor` (the ratings' anchor; the earliest version by
    default). Rows as `ratings` reads them, plus the replies' texts (`text_a`, `text_b`) or
    their style counts (`style_a`, `style_b`)."""
    from alignment.style_control import fit as style_fit

    rows = [r for r in rows if r["version_a"] != r["version_b"]]
    fitted = style_fit(rows, reference=anchor)
    if fitted is None:
        return {}
    out = {}
    for v, theta in fitted.theta.items():
        lo, hi = fitted.theta_interval(v)
        out[v] = {
            "score_style_controlled": round(ANCHOR + SCALE * theta, 1),
            "interval_style_controlled": [round(ANCHOR + SCALE * x, 1) for x in (lo, hi)],
        }
    return out
