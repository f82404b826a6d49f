"""Where votes came from, and how much of them one source may decide.

A vote's sources are its session and its client address (a keyed tag), each on its own: one
person can open many sessions from one address, or carry one session across addresses. A vote
with neither belongs to no source. No source may cast more than `max_share` of the decisive votes
(`--max-vote-source-share`, 0.5; 1 with `--single-user`). The scheduler refuses a cycle past it
(`source_refusal`, on the store's counts of the new votes); reward-model training and a canary's
verdict instead count one source's votes only up to that share (`cap_source_share`), so that
nobody decides alone what everybody is served, however many votes they cast.

Pure functions over plain rows; no I/O.
"""

from __future__ import annotations

import collections

SOURCES = ("session_id", "client")  # a vote's fields that name where it came from


def source_refusal(sources: dict, max_share: float) -> str | None:
    """Why a scheduled cycle must not train on these votes, or None. One session or one address
    that cast most of the new votes would steer the model for everybody."""
    if max_share >= 1 or not sources["votes"]:
        return None
    share = max(sources["top_session_share"], sources["top_address_share"])
    if share <= max_share:
        return None
    which = (
        "one session"
        if sources["top_session_share"] >= sources["top_address_share"]
        else "one client address"
    )
    return (
        f"{share:.0%} of the {sources['votes']} new votes came from {which} (at most "
        f"{max_share:.0%} allowed): one voter would steer the model for everybody; an admin "
        "can still retrain by hand"
    )


def cap_source_share(rows: list[dict], max_share: float) -> list[dict]:
    """The rows that count when no session and no address may hold more than `max_share` of
    the counted ones. `rows` are votes oldest first, each with `session_id` and `client`.

    Every source counts its earliest votes up to one cap, the same for all sources; a vote
    counts only while both its session and its address are under it. The cap is the largest
    (found by bisection) at which no source holds more than `max_share` of the counted votes.
    So at 0.5 one source counts at most as many votes as all the others together, however many
    it casts, and a source alone counts none; at 1 (one person's install) every vote counts.
    """
    if max_share >= 1:
        return list(rows)

    def counted(cap: int) -> tuple[list[dict], int]:
        held: collections.Counter[tuple[str, str]] = collections.Counter()
        kept = []
        for row in rows:
            keys = [(k, row[k]) for k in SOURCES if row.get(k) is not None]
            if all(held[key] < cap for key in keys):
                held.update(keys)
                kept.append(row)
        return kept, max(held.values(), default=0)

    def within_share(cap: int) -> bool:
        kept, largest = counted(cap)
        return largest <= max_share * len(kept)

    low, high = 0, len(rows)  # at cap 0 no source holds a vote: within any share
    if within_share(high):
        return list(rows)
    while high - low > 1:  # within_share(low) and not within_share(high)
        middle = (low + high) // 2
        low, high = (middle, high) if within_share(middle) else (low, middle)
    return counted(low)[0]
