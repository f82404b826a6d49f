"""Reward-hacking monitors: what each version's replies look like, side by side with what the
reward model and the users said about it, and warnings in words when they part ways.

PPO optimises a learned reward, so a version can win the reward model's gate by exploiting it
(longer replies, replies cut off at the token limit, the same phrase every time) while people
like it less: Gao et al. 2023 measure this over-optimisation. Per version: mean reply length in
words, share of replies cut off at the token limit, distinct-2 (distinct word bigrams over all
bigrams of its replies, Li et al. 2016), the gate's win rate and the users' canary win rate,
raw and style-controlled (`alignment.style_control`: at equal reply length and markdown; a gain
that disappears under it is warned of). Pure functions over rows; the chat service reads the
rows from the store.
"""

from __future__ import annotations

import functools

# How far a version may drift from its parent before the Admin tab warns (absolute changes,
# except length, which is relative).
LENGTH_DRIFT = 0.5  # replies 50 % longer or shorter
CUTOFF_DRIFT = 0.2  # 20 points more replies cut off at the token limit
DIVERSITY_DROP = 0.2  # distinct-2 down by 0.2
MIN_REPLIES = 10  # fewer replies than this say too little to warn on


def distinct_2(texts: list[str]) -> float | None:
    bigrams = [tuple(w[i : i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def reply_monitors(replies: list[dict]) -> dict:
    """Figures over a version's replies (`text`, `finish_reason`)."""
    n = len(replies)
    if not n:
        return {"replies": 0, "mean_words": None, "cut_off_share": None, "distinct_2": None}
    texts = [r["text"] for r in replies]
    return {
        "replies": n,
        "mean_words": round(sum(len(t.split()) for t in texts) / n, 2),
        "cut_off_share": round(sum(r["finish_reason"] == "length" for r in replies) / n, 3),
        "distinct_2": None if (d := distinct_2(texts)) is None else round(d, 3),
    }


def warnings(version: dict, parent: dict | None) -> list[str]:
    """Plain-words warnings for a version's record (`version`, `manifest`, `monitors`), against
    its parent's record."""
    out = []
    m = version.get("monitors") or {}
    gate = (version.get("manifest") or {}).get("gate") or {}
    human, interval = m.get("human_win_rate"), m.get("human_interval")
    if gate.get("deploy") and human is not None and interval and interval[1] < 0.5:
        out.append(
            f"{version['version']}: the reward model said better (gate win rate "
            f"{gate.get('win_rate', 0):.2f}) but the users said worse ({human:.2f}, "
            f"[{interval[0]:.2f}, {interval[1]:.2f}]): the reward model may be being gamed"
        )
    if m.get("human_style_note"):
        out.append(f"{version['version']}: in the users' canary votes, {m['human_style_note']}")
    p = (parent or {}).get("monitors") or {}
    if min(m.get("replies", 0), p.get("replies", 0)) < MIN_REPLIES:
        return out
    name, of = version["version"], parent["version"]
    if m["mean_words"] and p["mean_words"]:
        change = m["mean_words"] / p["mean_words"] - 1
        if abs(change) > LENGTH_DRIFT:
            longer = "longer" if change > 0 else "shorter"
            out.append(
                f"{name}: replies are {abs(change):.0%} {longer} than {of}'s "
                f"({m['mean_words']:.0f} words against {p['mean_words']:.0f})"
            )
    if m["cut_off_share"] - p["cut_off_share"] > CUTOFF_DRIFT:
        out.append(
            f"{name}: {m['cut_off_share']:.0%} of replies are cut off at the token limit "
            f"({of}: {p['cut_off_share']:.0%})"
        )
    d_new, d_old = m["distinct_2"], p["distinct_2"]
    if d_new is not None and d_old is not None and d_old - d_new > DIVERSITY_DROP:
        out.append(
            f"{name}: replies are less varied (distinct-2 {d_new:.2f} against {of}'s {d_old:.2f})"
        )
    return out


def annotate(
    versions: list[dict], cross_votes: list[dict], replies: list[dict], canaries: list[dict]
) -> list[dict]:
    """Give each version record its `rating` (Bradley-Terry over cross-version votes, raw and
    style-controlled), `monitors` (reply figures, gate and canary win rates, raw and
    style-controlled) and `warnings`, in place. `cross_votes` rows carry the replies' texts."""
    from alignment.canary import count_canary_votes, style_controlled
    from alignment.style_control import row_styles

    styled = []
    for r in cross_votes:
        style_a, style_b = row_styles(r)
        styled.append({**r, "style_a": style_a, "style_b": style_b})
    rated = _ratings(
        tuple((r["choice"], r["version_a"], r["version_b"], r["style_a"], r["style_b"])
              for r in styled)
    )  # fmt: skip
    by_version: dict[str, list[dict]] = {}
    for r in replies:
        by_version.setdefault(r["model_version"], []).append(r)
    verdicts = {}
    for c in canaries:
        # a decided canary's verdict stands on the votes cast until its decision, as the canary
        # itself counts them: votes on its leftover pairs do not turn the users' verdict around
        decided = c.get("decided_at")
        counted = [v for v in styled if decided is None or v["voted_at"] <= decided]
        votes = count_canary_votes(counted, c["challenger"], c["serving"])
        if votes.comparisons:
            verdicts[c["challenger"]] = (
                votes,
                style_controlled(counted, c["challenger"], c["serving"]),
            )
    for v in versions:
        gate = (v.get("manifest") or {}).get("gate") or {}
        monitors = reply_monitors(by_version.get(v["version"], []))
        monitors["gate_win_rate"] = gate.get("win_rate")
        votes, judged = verdicts.get(v["version"], (None, None))
        monitors["human_win_rate"] = None if votes is None else round(votes.win_rate, 4)
        monitors["human_interval"] = (
            None if votes is None else [round(x, 4) for x in votes.interval]
        )
        monitors["human_comparisons"] = 0 if votes is None else votes.comparisons
        # the same votes at equal reply length and markdown (alignment.style_control)
        monitors["human_win_rate_style_controlled"] = (
            None if judged is None else round(judged.win_rate_style_controlled, 4)
        )
        monitors["human_interval_style_controlled"] = (
            None if judged is None else [round(x, 4) for x in judged.interval_style_controlled]
        )
        monitors["human_style_note"] = None if judged is None else judged.note
        v["rating"] = rated.get(v["version"])
        v["monitors"] = monitors
    named = {v["version"]: v for v in versions}
    for v in versions:
        v["warnings"] = warnings(v, named.get(v.get("parent")))
    return versions


@functools.lru_cache(maxsize=4)
def _ratings(votes: tuple[tuple, ...]) -> dict[str, dict]:
    """Ratings, bootstrap and all, computed once per set of votes (choice, versions, the two
    replies' style counts): the Admin tab asks every two seconds and the votes rarely changed
    in between. Each rating gains its style-controlled score (`alignment.style_control`)."""
    from alignment.ratings import ratings, style_controlled_scores

    rows = [
        {"choice": c, "version_a": a, "version_b": b, "style_a": sa, "style_b": sb}
        for c, a, b, sa, sb in votes
    ]
    rated = ratings(rows)
    controlled = style_controlled_scores(rows, anchor=min(rated, default=None))
    return {v: {**r, **controlled.get(v, {})} for v, r in rated.items()}


def annotated_versions(store) -> list[dict]:
    """The store's version records, annotated (blocking: call it off the event loop)."""
    return annotate(
        store.model_versions(),
        store.cross_version_votes(),
        store.recent_replies(),
        store.canaries(),
    )
