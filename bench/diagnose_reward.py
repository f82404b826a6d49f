"""Can the reward model learn a SmolLM2 preference family from ~100 votes, and with what budget?

Offline, on v0 replies dumped by `python -m bench.smol_learning --calibrate 240 --dump FILE`: the
simulated user's decisive pairs become preference records; a single reward model is trained on
`--train` of them with each `--override` setting, and measured by the AUC with which its score
separates replies the user likes from replies it does not, over the replies it never trained on
(pointwise: many more than the held-out pairs a cycle has).

Online, each run draws its own ~100 votes, so one offline draw says little about how often a
setting fails: `--draws N` repeats every setting on N draws of training pairs (and head seeds),
and several `--dump` files (the same prompts sampled again) give the draws different votes.
Besides the AUC it reports the accuracy on the unseen decisive pairs, what a cycle's held-out
check measures.

Run: `.venv/bin/python -m bench.diagnose_reward --dump FILE [FILE...] --family opening
      --draws 3 --override '{}' '{"learning_rate": 1e-3}' '{"pooling": "last+mean"}'`;
     `--ensemble 3 --pairs-only` trains each setting as a cycle's ensemble (members on their own
     resamples) and measures the members' mean score, as the cycle's held-out check does;
     `--verdicts` draws training prompts rather than pairs and passes their ties and both-bad
     votes too (used as `reward.verdict_pairs` says), `--steps N` trains every setting N steps
     however many pairs it has (the budget's cut, not epochs, decides a cycle's steps).
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
from alignment.verdicts import cross_prompt_pairs
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


def verdict_rows(rows: list, likes) -> list[dict]:
    """The simulated user's ties (both liked) and both-bad votes (neither) as verdicts."""
    out = []
    for prompt, topic, (a, b) in rows:
        la, lb = likes(a, topic), likes(b, topic)
        if la == lb:
            out += [{"prompt": prompt, "reply": x, "accepted": la} for x in (a, b)]
    return out


def by_prompt(rows: list, likes, want: int, draw: int) -> tuple[list[dict], list[dict]]:
    """Training prompts drawn until their decisive votes number `want`: (their decisive
    records, their verdicts). All of a prompt's votes land on one side."""
    keys = sorted({json.dumps(p) for p, _, _ in rows})
    random.Random(1 + draw).shuffle(keys)
    chosen: set[str] = set()
    for key in keys:
        if len(decisive_pairs([r for r in rows if json.dumps(r[0]) in chosen], likes)) >= want:
            break
        chosen.add(key)
    mine = [r for r in rows if json.dumps(r[0]) in chosen]
    return decisive_pairs(mine, likes), verdict_rows(mine, likes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, nargs="+", required=True)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--train", type=int, default=80, help="decisive pairs to train on")
    parser.add_argument("--draws", type=int, default=1, help="draws of training pairs")
    parser.add_argument("--override", nargs="+", default=["{}"], help="RewardConfig fields")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="members per reward model (each on its own resample, as a cycle trains them): "
        "the AUC and accuracy are then the members' mean score's, with each member's accuracy",
    )
    parser.add_argument(
        "--verdicts",
        action="store_true",
        help="draw training prompts and pass their ties and both-bad votes as verdicts",
    )
    parser.add_argument("--steps", type=int, default=0, help="train every setting N steps")
    parser.add_argument(
        "--pairs-only",
        action="store_true",
        help="score only the unseen decisive pairs (no AUC over every unseen reply): a third "
        "of the scoring",
    )
    args = parser.parse_args()
    likes = FAMILIES[args.family]
    rows = []
    for dump in args.dump:
        dumped = json.loads(dump.read_text())
        items = prompts(TOPICS, random.Random(0))[: len(dumped)]
        for (question, topic), (dumped_topic, texts) in zip(items, dumped, strict=True):
            assert topic == dumped_topic
            rows.append(([{"role": "user", "content": question}], topic, texts))
    decisive = decisive_pairs(rows, likes)
    for draw in range(args.draws):
        random.Random(1 + draw).shuffle(decisive)
        train, verdicts = decisive[: args.train], []
        if args.verdicts:
            train, verdicts = by_prompt(rows, likes, args.train, draw)
        seen = {json.dumps(r["prompt"]) for r in train + verdicts}
        unseen = [(p, t, x) for p, t, texts in rows if json.dumps(p) not in seen for x in texts]
        unseen_pairs = [r for r in decisive if json.dumps(r["prompt"]) not in seen]
        print(
            f"draw {draw}: {len(decisive)} decisive pairs; train on {len(train)} "
            f"(and {len(verdicts)} verdicts); "
            f"score {len(unseen)} replies, {len(unseen_pairs)} decisive pairs",
            flush=True,
        )
        for override in args.override:
            row = measure(
                args.family,
                likes,
                train,
                [] if args.pairs_only else unseen,
                unseen_pairs,
                override,
                draw,
                args.ensemble,
                verdicts,
                args.steps,
            )
            print(json.dumps({"draw": draw, **row}), flush=True)


def measure(
    family,
    likes,
    train,
    unseen,
    unseen_pairs,
    override: str,
    seed: int,
    ensemble: int = 1,
    verdicts: list[dict] = (),
    steps: int = 0,
) -> dict:
    """One reward model on `train`: AUC over the unseen replies, accuracy on unseen pairs (of
    the members' mean score, each member on its own scale, as a cycle's held-out check)."""
    config = replace(
        RewardConfig(ensemble=ensemble, heldout_fraction=0.0, seed=seed), **json.loads(override)
    )
    if steps:
        extra = cross_prompt_pairs(train, list(verdicts), config.verdict_pairs, config.seed)
        config = replace(config, epochs=steps / -(-(len(train) + len(extra)) // config.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train_reward_model(str(SMOL), train, Path(tmp), config, verdicts=list(verdicts))
        train_s = time.perf_counter() - started
        scorer = RewardScorer.load(str(SMOL), tmp)
        replies = [p + [{"role": "assistant", "content": x}] for p, _, x in unseen]
        scores = scorer.member_scores(replies).mean(0).tolist() if unseen else []
        chosen = scorer.member_scores([r["prompt"] + r["chosen"] for r in unseen_pairs])
        rejected = scorer.member_scores([r["prompt"] + r["rejected"] for r in unseen_pairs])
    liked = [s for s, (_, t, x) in zip(scores, unseen, strict=True) if likes(x, t)]
    other = [s for s, (_, t, x) in zip(scores, unseen, strict=True) if not likes(x, t)]
    return {
        "family": family,
        "override": json.loads(override),
        "steps": result.steps,
        "verdict_pairs": result.verdict_pairs,
        "shared_steps": result.shared_steps,
        "train_loss": round(result.train_loss, 3),
        "train_s": round(train_s, 1),
        "auc_unseen": round(auc(liked, other), 3) if unseen else None,
        "pair_accuracy_unseen": round((chosen.mean(0) > rejected.mean(0)).float().mean().item(), 3),
        "member_pair_accuracy": [round(a, 3) for a in (chosen > rejected).float().mean(1).tolist()],
        "pairs": len(unseen_pairs),
        "liked": len(liked),
        "other": len(other),
    }


if __name__ == "__main__":
    main()
