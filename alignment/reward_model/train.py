"""Train the reward-model ensemble (TRL's `RewardTrainer` with a LoRA adapter per member),
within a cycle's time budget, and measure it on the held-out votes (`RewardResult`).

The members' votes come from `alignment.reward_model.data`; after training the ensemble is loaded
with `alignment.reward_model.score.RewardScorer` to put each member on a common scale.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from alignment import adapters
from alignment.budget import MIN_REWARD_STEPS, SCORE_PER_STEP, steps_that_fit
from alignment.config import RewardConfig
from alignment.losses import bradley_terry_loss, preference_accuracy
from alignment.precision import (
    attention_implementation,
    autocast,
    base_dtype,
    train_device,
    use_bf16,
)
from alignment.reward_model.data import member_votes, split_heldout
from alignment.reward_model.score import RewardScorer, check_pooling, pool_scores
from alignment.tracking import trainer_relay
from alignment.trunk_cache import TrunkCache
from alignment.verdicts import cross_prompt_pairs, implicit


@dataclass(kw_only=True)
class RewardResult:
    path: str  # the ensemble's folder: member-0/, member-1/, ... and ensemble.json
    n_train: int
    n_heldout: int
    train_loss: float | None  # mean over members
    heldout_loss: float | None  # of the ensemble's mean score
    heldout_accuracy: float | None  # of the ensemble's mean score on held-out human votes
    steps: int  # per member
    members: int = 1
    member_heldout_accuracy: list[float] | None = None
    heldout_disagreement: float | None = None  # mean std of member scores on held-out replies
    adapter: str = "lora"
    trainable_parameters: int | None = None  # per member: adapter and score head
    planned_steps: int | None = None  # per member, before a cycle budget cut them (`steps`)
    verdict_pairs: int = 0  # accepted-over-refused pairs from ties and both-bad votes
    shared_steps: int | None = None  # of the model every member started from (`warm_start`)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class MemberResult:
    """One reward model's training, as `_train_member` ran it."""

    loss: float  # TRL's mean training loss
    steps: int  # optimiser steps taken
    trainable_parameters: int  # adapter and score head
    planned_steps: int  # before a budget cut them
    step_seconds: float | None  # one step's time, measured under a budget: sizes the next member


def train_reward_model(
    base_model: str,
    records: list[dict],
    out_dir: Path,
    config: RewardConfig,
    on_log: Callable[[dict], None] | None = None,
    deadline: float | None = None,
    verdicts: list[dict] | None = None,
) -> RewardResult:
    """Train the reward-model ensemble on preference records; save it to `out_dir` and measure
    it on the held-out votes (per member and as an ensemble). With a `deadline` (monotonic
    seconds) each member trains for the steps that fit (`alignment.budget`). `verdicts`: the
    replies of ties and both-bad votes, trained on as accepted-over-refused pairs
    (`alignment.verdicts`, up to `reward.verdict_pairs` per decisive training vote)."""
    if not records:
        raise ValueError("no decisive votes (A or B) to train a reward model on")
    if config.ensemble < 1:
        raise ValueError(f"reward.ensemble must be at least 1, got {config.ensemble}")
    if not 0 <= config.subsample <= 1:
        raise ValueError(f"reward.subsample must be a share from 0 to 1, got {config.subsample}")
    check_pooling(config.pooling)  # before minutes of training, not after
    train, heldout = split_heldout(records, config.heldout_fraction)
    extra = cross_prompt_pairs(
        train, verdicts or [], config.verdict_pairs, config.seed, [r["prompt"] for r in heldout]
    )
    trunk = frozen_trunk(base_model, config)  # shared by the members and the scoring after
    members: list[MemberResult] = []
    step_seconds: float | None = None  # timed once, by the first model, under a deadline
    scored_after = 2 * len(records) * config.ensemble  # replies x members scored after training

    def scoring(step_s: float) -> float:
        """Seconds of the scoring that follows training, reserved out of the budget."""
        return SCORE_PER_STEP * step_s * scored_after

    warm = warm_start_share(config)
    shared, shared_steps = None, None
    if warm:  # one model on every vote first, for the share of the time `warm_start` gives it
        shared = out_dir / "shared"
        first = _train_member(
            base_model,
            train + extra,
            shared,
            replace(config, epochs=warm * config.epochs * config.ensemble),
            config.seed + 999,
            lambda log: on_log({"member": "shared", **log}) if on_log else None,
            seconds_for=(lambda s: warm * (deadline - time.monotonic() - scoring(s)))
            if deadline is not None
            else None,
            trunk=trunk,
        )
        shared_steps, step_seconds = first.steps, first.step_seconds
    member_config = replace(config, epochs=(1 - warm) * config.epochs) if warm else config
    for i in range(config.ensemble):
        data = member_votes(train + extra, config, config.seed * 1000 + i)

        def relay(log: dict, i: int = i) -> None:
            if on_log:
                on_log({"member": i, **log})

        def seconds_for(step_s: float, left: int = config.ensemble - i) -> float:
            """This member's share of the time left, after the scoring that follows."""
            return (deadline - time.monotonic() - scoring(step_s)) / left

        member = _train_member(
            base_model,
            data,
            out_dir / f"member-{i}",
            member_config,
            config.seed + i,
            relay,
            seconds_for=seconds_for if deadline is not None else None,
            step_seconds=step_seconds,
            trunk=trunk,
            start_from=shared,
        )
        step_seconds = member.step_seconds
        members.append(member)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)  # the members carry on from it: spent
    ensemble = {
        "members": [f"member-{i}" for i in range(len(members))],
        "pooling": config.pooling,
        "frozen_bottom": trunk.bottom if trunk else 0,
    }
    (out_dir / "ensemble.json").write_text(json.dumps(ensemble))  # unscaled
    # Members come out on different scales (each head starts from its own random init); put
    # each on mean 0 / std 1 over the voted replies, so that their spread measures disagreement
    # about the replies and not about units. Without it mean - std penalised every confident
    # score, and PPO on the conservative score stalled (bench/RESULTS.md).
    scorer = RewardScorer.load(
        base_model,
        str(out_dir),
        precision=config.precision,
        base_weights=config.base_weights,
        attention=config.attention,
        trunk=trunk,
    )
    replies = [r["prompt"] + r[side] for r in records for side in ("chosen", "rejected")]
    raw = scorer.member_scores(replies)  # (K, 2N)
    scale = [[m.mean().item(), max(m.std().item(), 1e-3)] for m in raw] if len(replies) > 1 else []
    (out_dir / "ensemble.json").write_text(json.dumps({**ensemble, "scale": scale}))
    scorer.scale = scale
    if scale:
        mean, std = torch.tensor(scale).T  # (K,), (K,)
        raw = (raw - mean[:, None]) / std[:, None]  # what `member_scores` now returns

    last = members[-1]
    result = RewardResult(
        path=str(out_dir),
        n_train=len(train),
        n_heldout=len(heldout),
        train_loss=sum(m.loss for m in members) / len(members),
        heldout_loss=None,
        heldout_accuracy=None,
        steps=last.steps,
        members=len(members),
        adapter=config.adapter,
        trainable_parameters=last.trainable_parameters,
        planned_steps=last.planned_steps,
        verdict_pairs=len(extra),
        shared_steps=shared_steps,
    )
    if heldout:  # the held-out votes were scored with the rest: reuse, do not score twice
        row = {id(r): j for j, r in enumerate(records)}
        rows = torch.tensor([row[id(r)] for r in heldout])
        r_w, r_l = raw[:, 2 * rows], raw[:, 2 * rows + 1]  # (K, N) chosen, rejected
        result.heldout_loss = bradley_terry_loss(r_w.mean(0), r_l.mean(0)).item()
        result.heldout_accuracy = preference_accuracy(r_w.mean(0), r_l.mean(0))
        result.member_heldout_accuracy = [
            preference_accuracy(w, lo) for w, lo in zip(r_w, r_l, strict=True)
        ]
        if len(members) > 1:
            result.heldout_disagreement = torch.cat([r_w, r_l], dim=1).std(0).mean().item()
    return result


def warm_start_share(config: RewardConfig) -> float:
    """The share of the reward models' training spent on the model every member starts from
    (0: members from scratch; only for LoRA ensembles)."""
    if not 0 <= config.warm_start < 1:
        raise ValueError(
            f"reward.warm_start must be a share from 0 to under 1, got {config.warm_start}"
        )
    if config.ensemble < 2 or config.adapter != "lora":
        return 0.0
    return config.warm_start


def frozen_trunk(base_model: str, config: RewardConfig) -> TrunkCache | None:
    """A cache of the blocks under the adapted ones (`reward.lora_layers`), shared by every
    member: None when every block is adapted (or the adapter is not LoRA)."""
    if config.adapter != "lora" or config.lora_layers <= 0:
        return None
    from transformers import AutoConfig

    total = AutoConfig.from_pretrained(base_model).num_hidden_layers
    return TrunkCache(total - config.lora_layers) if config.lora_layers < total else None


def lora_targets(model, top: int) -> dict:
    """LoraConfig arguments: every linear layer of the transformer, or only those of its top
    `top` blocks. Adapting only the top lets autograd stop there: the frozen bottom runs
    forward only (peft takes a layer range only with the module names spelled out)."""
    if top < 0:
        raise ValueError(f"reward.lora_layers must be 0 (all) or positive, got {top}")
    total = model.config.num_hidden_layers
    if top == 0 or top >= total:
        return {"target_modules": "all-linear"}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(p.isdigit() for p in name.split("."))
    }
    return {"target_modules": sorted(names), "layers_to_transform": list(range(total - top, total))}


def _train_member(
    base_model: str,
    train: list[dict],
    out_dir: Path,
    config: RewardConfig,
    seed: int,
    on_log: Callable[[dict], None],
    seconds_for: Callable[[float], float] | None = None,
    step_seconds: float | None = None,
    trunk: TrunkCache | None = None,
    start_from: Path | None = None,
) -> MemberResult:
    """One reward model with TRL's RewardTrainer. `seconds_for(step seconds)` is the time this
    member may train (None: no budget); `step_seconds` a step time already measured;
    `start_from`: a saved adapter and head to go on training (`reward.warm_start`)."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)  # the score head's initialisation differs per member
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model,
        num_labels=1,
        dtype=base_dtype(config.base_weights, train_device()),
        attn_implementation=attention_implementation(config.attention, train_device()),
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    args = TRLRewardConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",  # its logs reach the cycle's trackers through the relay
        gradient_checkpointing=config.gradient_checkpointing,
        use_cpu=train_device() == "cpu",
        bf16=use_bf16(config.precision, train_device()),
        seed=seed,
        disable_tqdm=True,
    )
    if start_from is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(start_from), is_trainable=True)
        peft_config = None
    elif config.adapter == "lora":
        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            **lora_targets(model, config.lora_layers),
        )
    else:
        peft_config = adapters.peft_config(
            config.adapter, TaskType.SEQ_CLS, config.lora_rank, config.lora_alpha
        )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([implicit(r) for r in train]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[trainer_relay(on_log)],
    )
    pool_scores(trainer.model, config.pooling)
    if trunk is not None:
        trunk.install(trainer.model)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    planned = math.ceil(config.epochs * math.ceil(len(trainer.train_dataset) / config.batch_size))
    if seconds_for is not None:
        step_seconds = step_seconds or _time_a_step(trainer, config)
        trainer.args.max_steps = steps_that_fit(
            seconds_for(step_seconds), step_seconds, planned, MIN_REWARD_STEPS
        )
    output = trainer.train()
    if seconds_for is not None and output.global_step:
        # the steps as they ran size the next member: a probe can be caught by a busy moment
        step_seconds = output.metrics["train_runtime"] / output.global_step
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return MemberResult(
        loss=output.training_loss,
        steps=output.global_step,
        trainable_parameters=trainable,
        planned_steps=planned,
        step_seconds=step_seconds,
    )


def _time_a_step(trainer, config: RewardConfig) -> float:
    """Seconds of one training step (forward and backward of a batch of real pairs), timed
    before training, so that a budget can size the steps: the faster of the second and third
    of three (the first pays one-time costs; in the app one probe step once took twice the
    steps' time, caught by something else running). The gradients are dropped and no
    optimiser runs, so the model trains exactly as it would have."""
    model = trainer.model
    pairs = trainer.train_dataset
    batch = trainer.data_collator([pairs[j] for j in range(min(config.batch_size, len(pairs)))])
    device = next(model.parameters()).device
    times = []
    for _ in range(3):
        started = time.perf_counter()
        with autocast(config.precision, str(device)):
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits.squeeze(-1)
        chosen, rejected = torch.chunk(logits.float(), 2)
        bradley_terry_loss(chosen, rejected).backward()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return min(times[1:])
