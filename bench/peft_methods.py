"""The seed document's PEFT methods on SmolLM2, on the same data: trainable parameters, step
time, peak memory, and what each learns.

- Reward model (every method): one model on `--train` of the simulated `--family` user's
  decisive pairs from a calibration dump (`python -m bench.smol_learning --calibrate 240 --dump
  FILE`), scored by the AUC with which it separates liked from other replies to unseen prompts.
- SFT (the mergeable methods, LoRA and IA3): the replies that user likes as demonstrations,
  loss on held-out demonstrations before and after.

Each method runs in its own process so that its peak memory is its own.
Run: `.venv/bin/python -m bench.peft_methods --dump FILE [--family plain]`
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.diagnose_reward import auc, decisive_pairs
from bench.smol_learning import FAMILIES, SMOL, TOPICS, prompts

METHODS = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
# a learning rate per method: the soft-prompt methods need a larger step than LoRA (PEFT's
# examples use 1e-2 to 3e-2 for prompt tuning)
LEARNING_RATES = {"lora": 2e-3, "ia3": 5e-3, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2}


def _rows(dump: Path) -> list[tuple[list[dict], str, list[str]]]:
    dumped = json.loads(dump.read_text())
    items = prompts(TOPICS, random.Random(0))[: len(dumped)]
    return [
        ([{"role": "user", "content": q}], topic, texts)
        for (q, topic), (_, texts) in zip(items, dumped, strict=True)
    ]


def one(method: str, stage: str, dump: Path, family: str, n_train: int) -> dict:
    from alignment.config import RewardConfig, SFTConfig
    from alignment.reward_model import RewardScorer, train_reward_model
    from alignment.sft import train_sft

    likes = FAMILIES[family]
    rows = _rows(dump)
    rng = random.Random(1)
    started = time.perf_counter()
    if stage == "reward":
        decisive = decisive_pairs(rows, likes)
        rng.shuffle(decisive)
        train = decisive[:n_train]
        seen = {json.dumps(r["prompt"]) for r in train}
        config = replace(
            RewardConfig(ensemble=1, heldout_fraction=0.0),
            adapter=method,
            learning_rate=LEARNING_RATES[method],
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = train_reward_model(str(SMOL), train, Path(tmp), config)
            seconds = time.perf_counter() - started
            scorer = RewardScorer.load(str(SMOL), tmp)
            unseen = [(p, t, x) for p, t, xs in rows if json.dumps(p) not in seen for x in xs]
            scores = scorer.member_scores(
                [p + [{"role": "assistant", "content": x}] for p, _, x in unseen]
            )[0].tolist()
        liked = [s for s, (_, t, x) in zip(scores, unseen, strict=True) if likes(x, t)]
        other = [s for s, (_, t, x) in zip(scores, unseen, strict=True) if not likes(x, t)]
        figures = {
            "trainable": result.trainable_parameters,
            "steps": result.steps,
            "train_loss": round(result.train_loss, 3),
            "auc_unseen": round(auc(liked, other), 3),
        }
    else:
        demos = [
            {"prompt": p, "completion": [{"role": "assistant", "content": x}]}
            for p, t, xs in rows
            for x in xs
            if likes(x, t)
        ]
        rng.shuffle(demos)
        train, heldout = demos[:n_train], demos[n_train : n_train + 40]
        config = replace(SFTConfig(enabled=True), adapter=method, learning_rate=2e-4, epochs=2)
        with tempfile.TemporaryDirectory() as tmp:
            result = train_sft(str(SMOL), train, Path(tmp), config)
            seconds = time.perf_counter() - started
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from alignment.sft import completion_loss

            merged = Path(result["path"])
            tokenizer = AutoTokenizer.from_pretrained(merged)
            before = completion_loss(
                AutoModelForCausalLM.from_pretrained(str(SMOL)), tokenizer, heldout
            )
            after = completion_loss(
                AutoModelForCausalLM.from_pretrained(merged), tokenizer, heldout
            )
        figures = {
            "steps": result["steps"],
            "heldout_loss_before": round(before, 3),
            "heldout_loss_after": round(after, 3),
            "examples": len(train),
        }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "stage": stage,
        "method": method,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(figures["steps"], 1), 2),
        "peak_rss_mb": round(peak_mb),
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, required=True)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="plain")
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, stage = args.one
        print(json.dumps(one(method, stage, args.dump, args.family, args.train)), flush=True)
        return
    runs = [(m, "reward") for m in METHODS] + [(m, "sft") for m in ("lora", "ia3")]
    for method, stage in runs:
        out = subprocess.run(
            [sys.executable, "-m", "bench.peft_methods", "--dump", str(args.dump),
             "--family", args.family, "--train", str(args.train), "--one", method, stage],
            capture_output=True, text=True,
        )  # fmt: skip
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"method": method, "stage": stage,
              "error": out.stderr[-400:]}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
