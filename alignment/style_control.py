"""Style-controlled judging: how much of a version's win rate is its replies' length and markdown.

People's votes lean towards longer, better-formatted replies whatever they say (Dubois et al.
2024, length-controlled AlpacaEval; LMArena's "style control", Li, Angelopoulos and Chiang,
2024-08-28). A version that learned to write longer wins votes for that alone. Following
LMArena, the votes are fitted with a Bradley-Terry (logistic) model that has a strength per
version and, beside them, a coefficient per style difference between the two replies:

    P(reply a wins) = sigmoid(theta[version_a] - theta[version_b] + beta . style(a, b))

where style(a, b) holds which reply is longer in words (`longer`: +1, -1, or 0 when alike)
and, per element, LMArena's normalised difference (count_a - count_b) / (count_a + count_b + 1)
of: words, markdown headers, list items, bold spans and fenced code blocks (each in (-1, 1), 0
when the two replies are alike). `longer` is ours, beside LMArena's: a crisp taste ("the
shorter one") is a step in length, which the normalised difference alone fits badly, and the
misfit leaks into the version terms (on votes where the longer reply wins 90 % whatever the
version and one version writes the longer reply 80 % of the time, 60 sets of 400 votes: its
controlled win rate averaged 0.55 with the normalised difference alone, 0.49 with `longer`
beside it, where the truth is 0.5; tests/test_style_control.py builds such votes). The
**style-controlled win rate** of version x against y is sigmoid(theta[x] - theta[y]): what the
fit says x wins at equal style. Beside it stays the **raw** win rate (wins + half the ties, over
the comparisons). A gain in the raw figure that disappears in the controlled one was the
replies' length or markdown, not the version, and is reported as such (`style_note`).

Choices:
- ties count half (outcome 0.5), "both bad" is left out: the same votes and weights as the raw
  win rate, the canary and the ratings count, so the two figures differ only by the style terms
  (LMArena also counts a tie as half a win each); dropping ties would move the controlled figure
  away from the raw one for a reason that is not style.
- one version (the reference; by default the earliest by name) has theta fixed at 0; no
  intercept (which slot a reply sits in is random).
- a small L2 ridge (`RIDGE`, on every parameter) keeps tiny samples finite (one vote, or the
  longer reply winning every time): about the half virtual tie per pair that
  `alignment.ratings` adds, so at equal style the controlled figure is close to the rating's.
  Each style column is fitted in units of its root mean square over the votes (not centred: 0
  stays "alike"), as LMArena standardises its features, so the one ridge means the same for
  every element; the coefficients are reported per unit of each difference (RMS units undone).
- when one version's replies are the longer in every vote, the votes cannot tell the version
  from the length: the ridge splits the effect between them and the controlled interval is
  wide, which is the honest answer.
- the fit is Newton's method on the penalised log-likelihood (a few parameters; convex), with
  step halving; deterministic. Intervals are the Laplace (Wald) ones from the penalised
  Hessian, on the logit scale, then mapped through the sigmoid.
- rows whose two replies came from one version inform only the style coefficients (their
  version terms cancel); callers here pass cross-version votes.

Pure functions over vote rows (`choice`, `version_a`, `version_b`, and `text_a`/`text_b` or
already counted `style_a`/`style_b`); numpy only.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np

from alignment.stats import wilson_interval

# `longer`: which reply has more words (+1 a, -1 b, 0 alike); the rest, per `style_counts`
# element, LMArena's normalised difference
STYLE_FEATURES = ("longer", "words", "headers", "list_items", "bold", "code_blocks")
RIDGE = 0.125
Z95 = 1.96

_CODE_BLOCK = re.compile(r"```.*?```", re.DOTALL)
_HEADER = re.compile(r"^ {0,3}#{1,6}\s+\S", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


@functools.lru_cache(maxsize=1 << 15)
def style_counts(text: str) -> tuple[int, ...]:
    """Words (whitespace-separated, code included), then the markdown
    elements outside code blocks: headers, list items, bold spans, and fenced code blocks.
    Cached: the Admin tab asks every few seconds about mostly the same replies."""
    code_blocks = len(_CODE_BLOCK.findall(text))
    prose = _CODE_BLOCK.sub(" ", text)
    return (
        len(text.split()),
        len(_HEADER.findall(prose)),
        len(_LIST_ITEM.findall(prose)),
        len(_BOLD.findall(prose)),
        code_blocks,
    )


def style_difference(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[float, ...]:
    """Per `STYLE_FEATURES`: which reply is longer, then LMArena's normalised difference
    (a - b) / (a + b + 1) per counted element."""
    longer = float((a[0] > b[0]) - (a[0] < b[0]))
    return (longer, *((x - y) / (x + y + 1) for x, y in zip(a, b, strict=True)))


def row_styles(row: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two replies' style counts: `style_a`/`style_b` when given, else from the texts."""
    if "style_a" in row:
        return tuple(row["style_a"]), tuple(row["style_b"])
    return style_counts(row.get("text_a") or ""), style_counts(row.get("text_b") or "")


def _outcome(choice: str) -> float | None:
    return {"a": 1.0, "b": 0.0, "tie": 0.5}.get(choice)


@dataclass(frozen=True)
class StyleFit:
    """The fitted model: `theta` per version (logits, the reference at 0), `beta` per style
    element, and the covariance of the version terms (Laplace, from the penalised Hessian)."""

    reference: str
    theta: dict[str, float]
    beta: dict[str, float]
    votes: int
    _index: dict[str, int] = field(repr=False)
    _cov: np.ndarray = field(repr=False)

    def logit(self, version: str, other: str) -> tuple[float, float]:
        """theta[version] - theta[other] and its standard error."""
        c = np.zeros(len(self._index))
        for v, sign in ((version, 1.0), (other, -1.0)):
            if v in self._index:
                c[self._index[v]] += sign
        d = self.theta[version] - self.theta[other]
        return d, float(math.sqrt(max(c @ self._cov @ c, 0.0)))

    def win_rate(self, version: str, other: str) -> float:
        """P(version's reply beats other's) at equal style."""
        return _sigmoid(self.logit(version, other)[0])

    def interval(self, version: str, other: str) -> tuple[float, float]:
        d, se = self.logit(version, other)
        return _sigmoid(d - Z95 * se), _sigmoid(d + Z95 * se)

    def theta_interval(self, version: str) -> tuple[float, float]:
        """theta[version]'s 95 % interval (the reference's is [0, 0])."""
        d, se = self.logit(version, self.reference)
        return d - Z95 * se, d + Z95 * se

    def twice_as_long_wins(self) -> float:
        """What the length terms alone give a reply twice as long as the other (it is the
        longer, its words' normalised difference about 1/3), everything else equal: how hard
        length pulls on the votes."""
        return _sigmoid(self.beta.get("longer", 0.0) + self.beta.get("words", 0.0) / 3)

    def summary(self) -> dict:
        return {
            "coefficients": {k: round(v, 4) for k, v in self.beta.items()},
            "twice_as_long_wins": round(self.twice_as_long_wins(), 4),
            "votes": self.votes,
        }


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def fit(
    rows: list[dict],
    reference: str | None = None,
    ridge: float = RIDGE,
    features: tuple[str, ...] = STYLE_FEATURES,
) -> StyleFit | None:
    """Fit the style-controlled Bradley-Terry model to vote rows (see the module); None when
    no version was compared with another (nothing to fit)."""
    used = [r for r in rows if _outcome(r["choice"]) is not None]
    versions = sorted({r["version_a"] for r in used} | {r["version_b"] for r in used})
    if not any(r["version_a"] != r["version_b"] for r in used):
        return None
    reference = reference if reference in versions else versions[0]
    free = [v for v in versions if v != reference]
    index = {v: i for i, v in enumerate(free)}
    keep = [STYLE_FEATURES.index(f) for f in features]
    k, n = len(free), len(used)
    x = np.zeros((n, k + len(keep)))
    y = np.empty(n)
    for i, r in enumerate(used):
        if r["version_a"] != r["version_b"]:
            if r["version_a"] in index:
                x[i, index[r["version_a"]]] += 1.0
            if r["version_b"] in index:
                x[i, index[r["version_b"]]] -= 1.0
        diff = style_difference(*row_styles(r))
        x[i, k:] = [diff[j] for j in keep]
        y[i] = _outcome(r["choice"])
    # each style column in units of its root mean square (see the module)
    scale = np.sqrt(np.mean(x[:, k:] ** 2, axis=0))
    scale[scale == 0] = 1.0
    x[:, k:] /= scale
    params, hessian = _newton(x, y, np.full(x.shape[1], ridge))
    cov = np.linalg.inv(hessian)[:k, :k]
    theta = {reference: 0.0, **{v: float(params[index[v]]) for v in free}}
    beta = {f: float(params[k + j] / scale[j]) for j, f in enumerate(features)}
    return StyleFit(reference, theta, beta, n, index, cov)


def _newton(x: np.ndarray, y: np.ndarray, ridge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the ridge-penalised logistic loss (Newton steps, halved until the loss does
    not rise): its minimiser and the Hessian there."""

    def loss(w: np.ndarray) -> float:
        z = x @ w
        # -[y log s(z) + (1 - y) log(1 - s(z))] = log(1 + e^z) - y z
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(ridge * w * w))

    def hessian(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = 1 / (1 + np.exp(-(x @ w)))
        return p, (x * (p * (1 - p))[:, None]).T @ x + np.diag(ridge)

    w = np.zeros(x.shape[1])
    current = loss(w)
    for _ in range(100):
        p, h = hessian(w)
        step = np.linalg.solve(h, x.T @ (p - y) + ridge * w)
        t = 1.0
        while (candidate := loss(w - t * step)) > current + 1e-12 and t > 1e-8:
            t /= 2
        w, gain, current = w - t * step, current - candidate, candidate
        if np.max(np.abs(t * step)) < 1e-10 or gain < 1e-13:
            break
    return w, hessian(w)[1]


@dataclass(frozen=True)
class PairJudgement:
    """One version against another: the raw and the style-controlled win rate of `version`."""

    version: str
    against: str
    comparisons: int  # votes that count (ties as half, both-bad left out)
    win_rate: float
    interval: tuple[float, float]  # Wilson, as the canary's
    win_rate_style_controlled: float
    interval_style_controlled: tuple[float, float]
    style: dict | None = None  # the fit's `StyleFit.summary()`: its coefficients

    @property
    def note(self) -> str | None:
        controlled = self.win_rate_style_controlled, self.interval_style_controlled
        return style_note(self.win_rate, self.interval, *controlled)

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "against": self.against,
            "comparisons": self.comparisons,
            "win_rate": round(self.win_rate, 4),
            "interval": [round(b, 4) for b in self.interval],
            "win_rate_style_controlled": round(self.win_rate_style_controlled, 4),
            "interval_style_controlled": [round(b, 4) for b in self.interval_style_controlled],
            "style_note": self.note,
            "style": self.style,
        }


def raw_win_rate(rows: list[dict], version: str, against: str) -> tuple[float, int]:
    """`version`'s share of wins (a tie half) over the counted votes between the two."""
    wins = n = 0.0
    for r in rows:
        if {r["version_a"], r["version_b"]} != {version, against} or r["choice"] == "both_bad":
            continue
        n += 1
        if r["choice"] == "tie":
            wins += 0.5
        elif (r["version_a"] if r["choice"] == "a" else r["version_b"]) == version:
            wins += 1
    return (wins / n if n else math.nan), int(n)


def judge(
    rows: list[dict], version: str, against: str, fitted: StyleFit | None = None
) -> PairJudgement | None:
    """`version` against `against` on these rows: a `PairJudgement`, or None when no vote
    compared them. `fitted`: a fit over these rows (or more) to reuse."""
    rate, n = raw_win_rate(rows, version, against)
    if not n:
        return None
    fitted = fitted or fit(rows, reference=against)
    return PairJudgement(
        version=version,
        against=against,
        comparisons=n,
        win_rate=rate,
        interval=wilson_interval(rate * n, n),
        win_rate_style_controlled=fitted.win_rate(version, against),
        interval_style_controlled=fitted.interval(version, against),
        style=fitted.summary(),
    )


def judge_all(rows: list[dict], reference: str | None = None) -> dict:
    """Every pair of versions compared in `rows`, the later-named against the earlier, raw
    and style-controlled, from one fit over all of them, with the style coefficients: what
    the bench reports for a set of votes."""
    fitted = fit(rows, reference)
    if fitted is None:
        return {"pairs": [], "style": None}
    compared = {
        tuple(sorted((r["version_a"], r["version_b"])))
        for r in rows
        if r["version_a"] != r["version_b"] and r["choice"] != "both_bad"
    }
    pairs = []
    for earlier, later in sorted(compared):
        judged = judge(rows, later, earlier, fitted)
        pairs.append({k: v for k, v in judged.as_dict().items() if k != "style"})
    return {"pairs": pairs, "style": fitted.summary()}


def style_note(
    raw: float,
    raw_interval: tuple[float, float] | list[float],
    controlled: float,
    controlled_interval: tuple[float, float] | list[float],
) -> str | None:
    """In words, when style control changes the verdict: a gain that the raw votes show
    (interval above 0.5) but that is not there at equal style (controlled interval reaching
    0.5 or below) "disappears under style control"; a gain seen only at equal style "appears".
    None when both say the same."""
    lo, hi = controlled_interval
    said = f"{raw:.2f} raw, {controlled:.2f} [{lo:.2f}, {hi:.2f}] at equal length and markdown"
    if raw_interval[0] > 0.5 and controlled_interval[0] <= 0.5:
        return (
            f"the gain disappears under style control ({said}): the votes favoured its "
            "replies' length or markdown, not clearly the version"
        )
    if raw_interval[0] <= 0.5 and controlled_interval[0] > 0.5:
        return f"a gain appears under style control ({said}): its style hid it in the votes"
    if raw_interval[1] < 0.5 and controlled_interval[1] >= 0.5:
        return (
            f"the loss disappears under style control ({said}): the votes held its replies' "
            "length or markdown against it, not clearly the version"
        )
    return None
