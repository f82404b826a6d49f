"""Can the reward model learn a SmolLM2 preference family from ~100 votes, and with what budget?

Offline, on v0 replies dumped by `python -m bench.smol_learning --calibrate 240 --dump FILE`: the
simulated user's decisive pairs become preference records; a single reward model is trained on
`--train` of them with each `--override` setting, and measured by the AUC with which its score
separates replies the user likes from replies it does not, over the replies it never trained on
(pointwise: many more than the held-out pairs a cycle has).

Run: `.venv/bin/python -m bench.diagnose_reward --dump FILE --family opening
      --override '{}' '{"learning_rate": 1e-3}' '{"epochs": 6}'`
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from alignment.config import RewardConfig
from alignment.reward_model import RewardScorer, train_reward_model
from bench.smol_learning import FAMILIES, SMOL, TOPICS, prompts


def auc(positive: list[float], negative: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return sum(pairs) / max(len(pairs), 1)


def decisive_pairs(rows: list, likes) -> list[dict]:
    """The simulated user's decisive votes on dumped (prompt, topic, (reply a, reply b)) rows,
    as preference records."""
    decisive = []
    for prompt, topic, (a, b) in rows:
        la, lb = likes(a, topic), likes(b, topic)
        if la != lb:
            chosen, rejected = (a, b) if la else (b, a)
            decisive.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return decisive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, required=True)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--train", type=int, default=80, help="decisive pairs to train on")
    parser.add_argument("--override", nargs="+", default=["{}"], help="RewardConfig fields")
    args = parser.parse_args()
    likes = FAMILIES[args.family]
    dumped = json.loads(args.dump.read_text())
    items = prompts(TOPICS, random.Random(0))[: len(dumped)]
    rows = []
    for (question, topic), (dumped_topic, texts) in zip(items, dumped, strict=True):
        assert topic == dumped_topic
        rows.append(([{"role": "user", "content": question}], topic, texts))
    decisive = decisive_pairs(rows, likes)
    random.Random(1).shuffle(decisive)
    train = decisive[: args.train]
    seen = {json.dumps(r["prompt"]) for r in train}
    unseen = [(p, t, x) for p, t, texts in rows if json.dumps(p) not in seen for x in texts]
    print(f"{len(decisive)} decisive pairs; train on {len(train)}; score {len(unseen)} replies")
    for override in args.override:
        config = replace(RewardConfig(ensemble=1, heldout_fraction=0.0), **json.loads(override))
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = train_reward_model(str(SMOL), train, Path(tmp), config)
            train_s = time.perf_counter() - started
            scorer = RewardScorer.load(str(SMOL), tmp)
            scores = scorer.member_scores(
                [p + [{"role": "assistant", "content": x}] for p, _, x in unseen]
            )[0].tolist()
        liked = [s for s, (_, t, x) in zip(scores, unseen, strict=True) if likes(x, t)]
        other = [s for s, (_, t, x) in zip(scores, unseen, strict=True) if not likes(x, t)]
        print(
            json.dumps(
                {
                    "family": args.family,
                    "override": json.loads(override),
                    "steps": result.steps,
                    "train_loss": round(result.train_loss, 3),
                    "train_s": round(train_s, 1),
                    "auc_unseen": round(auc(liked, other), 3),
                    "liked": len(liked),
                    "other": len(other),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
