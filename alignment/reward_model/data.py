"""The votes the reward models train on: the held-out split and each ensemble member's share.

Plain lists of TRL conversational preference records in, lists out; no model, no torch. The split
is by a hash of each pair's content, so a pair lands on the same side in every cycle.
"""

from __future__ import annotations

import hashlib
import json
import random

from alignment.config import RewardConfig


def split_heldout(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by content hash: stable across cycles as votes accumulate."""
    train, heldout = [], []
    for r in records:
        digest = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).digest()
        (heldout if digest[0] / 256 < fraction else train).append(r)
    if not train and heldout:  # tiny data: never train on nothing
        train, heldout = heldout, []
    return train, heldout


def bootstrap(records: list[dict], seed: int) -> list[dict]:
    """A resample with replacement of the same size: each member sees its own view of the votes."""
    rng = random.Random(seed)
    return [rng.choice(records) for _ in records]


def subsample(records: list[dict], share: float, seed: int) -> list[dict]:
    """`share` of the records, none twice, in their order."""
    keep = sorted(random.Random(seed).sample(range(len(records)), round(share * len(records))))
    return [records[j] for j in keep]


def member_votes(train: list[dict], config: RewardConfig, seed: int) -> list[dict]:
    """The votes one ensemble member trains on: a subsample, a bootstrap resample or all."""
    if config.ensemble < 2:
        return train
    if config.subsample:
        return subsample(train, config.subsample, seed)
    return bootstrap(train, seed) if config.bootstrap else train
