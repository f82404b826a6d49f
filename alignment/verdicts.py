"""Ties and "both bad" votes as preference data: a reply the user let stand over one they refused.

A decisive vote (A or B) says which of two replies to one prompt is the better; a tie or a
"both bad" says nothing between its two replies, so `storage.export` leaves them out of the
pairs. They do say something about each reply on its own: after a tie the conversation goes on
(both replies were acceptable), after "both bad" it does not (both were refused and the user asks
again). A user who votes consistently casts more of them than decisive votes: SmolLM2's
simulated users of `bench/smol_learning.py` cast 124-245 alongside their 75-100 decisive ones.

Paired across prompts, an accepted reply over a refused one, they enter the reward models'
Bradley-Terry loss unchanged (TRL's implicit-prompt format: each side is a whole
conversation). What such a pair adds beyond its reply's merit is an offset between two prompts,
which costs PPO nothing (RLOO's baseline is the other replies to the same prompt) nor the gate
(it compares two replies to the same prompt). The held-out check stays on decisive votes only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def conversation(prompt: list[dict[str, str]], reply: str) -> list[dict[str, str]]:
    return [*prompt, {"role": "assistant", "content": reply}]


def implicit(record: dict) -> dict:
    """A preference record with its prompt folded into both sides, as the cross-prompt pairs
    are (TRL concatenates an explicit prompt the same way: the text trained on is identical)."""
    if "prompt" not in record:
        return record
    return {
        "chosen": record["prompt"] + record["chosen"],
        "rejected": record["prompt"] + record["rejected"],
    }


def cross_prompt_pairs(
    decisive: list[dict],
    verdicts: list[dict],
    per_decisive: float,
    seed: int,
    exclude_prompts: Sequence[list[dict[str, str]]] = (),
) -> list[dict]:
    """Accepted-over-refused pairs, at most `per_decisive` per decisive record.

    `verdicts` are `{"prompt", "reply", "accepted"}` (`storage.export.verdict_records`). The
    accepted side is drawn from the accepted replies and the winners of the decisive votes
    (those replies continued the conversation); the refused side only from "both bad" votes (a
    decisive vote's loser was less good, not refused). Each refused reply is used at most once,
    each accepted one as evenly as the counts allow. `exclude_prompts`: the held-out votes'
    prompts, whose replies must not be trained on."""
    if per_decisive <= 0:
        return []
    held_out = {repr(p) for p in exclude_prompts}
    usable = [v for v in verdicts if repr(v["prompt"]) not in held_out]
    refused = [conversation(v["prompt"], v["reply"]) for v in usable if not v["accepted"]]
    accepted = [conversation(v["prompt"], v["reply"]) for v in usable if v["accepted"]]
    accepted += [r["prompt"] + r["chosen"] for r in decisive if "prompt" in r]
    if not refused or not accepted:
        return []
    rng = random.Random(seed)
    rng.shuffle(refused)
    rng.shuffle(accepted)
    count = min(len(refused), int(per_decisive * len(decisive)))
    return [{"chosen": accepted[i % len(accepted)], "rejected": refused[i]} for i in range(count)]
