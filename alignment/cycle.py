"""One retrain cycle, as a plain function over files and callbacks (no database, no server):

  preference records -> reward model -> PPO on LoRA (rollouts from the serving engine)
  -> gate against the serving policy -> merge into a new numbered version with a manifest.

Hot-swapping the result into the engine and recording it in DuckDB belong to the caller, which owns
the engine and the store. `progress` receives (stage, details) as the cycle goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignment.budget import CycleBudget
from alignment.config import CycleConfig
from alignment.gate import GateResult, evaluate, reward_refusal
from alignment.job import JobResult
from alignment.merge import merge_to_checkpoint
from alignment.ppo import PolicyWithValueHead, PPOTrainer
from alignment.reward_model import RewardScorer, split_heldout, train_reward_model
from alignment.rollouts import GenerateFn, Rollouts, as_rollouts
from alignment.support import reply_support, token_counter
from alignment.tracking import Tracker

Progress = Callable[[str, dict], None]
__all__ = ["CycleConfig", "CycleInputs", "CycleResult", "run_cycle"]


CycleResult = JobResult  # what a cycle returns is what the worker hands the app


@dataclass(frozen=True)
class CycleInputs:
    """What one cycle works from, gathered once by its caller (the worker from a job folder, a
    test or a benchmark from its own data) and handed down whole: the stages then read one
    named field each instead of a dozen positional arguments that every hop had to repeat in
    the same order."""

    # the checkpoint the engine serves: the cycle's base model and KL reference (after SFT the
    # SFT model takes both roles, but rollouts stay on these served weights)
    serving_model: str
    parent_version: str  # its version name: the new version's parent in the manifest
    new_version: str  # the name reserved for the result: its folder, manifest and work files
    records: list[dict]  # decisive preference pairs: what the reward models learn from
    # chats to roll out from: PPO trains on most of them, the gate compares on a held-out share
    prompts: list[list[dict[str, str]]]
    # samples from the serving engine (PPO's rollouts, the gate's baseline); a `Rollouts` can
    # follow the policy's adapter, a plain function always samples the serving weights
    serving_generate: Rollouts | GenerateFn
    # the versions folder: the merged checkpoint and adapter go here, work files (reward models,
    # SFT model, TensorBoard) under runs/<new_version>
    out_root: Path
    config: CycleConfig  # the cycle's settings, resolved and checked once by the caller
    # corrected replies and demonstrations (`storage.export`), for the SFT stage when
    # `sft.enabled`; None or empty skips it
    revisions: list[dict] | None = None
    # the replies of ties and both-bad votes (`storage.export.verdict_records`), which the
    # reward models train on as `reward.verdict_pairs` says
    verdicts: list[dict] | None = None

    @property
    def work_dir(self) -> Path:
        """This cycle's own work files, beside the versions and apart from other cycles'."""
        return self.out_root / "runs" / self.new_version


def run_cycle(inputs: CycleInputs, progress: Progress | None = None) -> CycleResult:
    """Run every stage on `inputs`; `progress` hears each stage's (name, details)."""
    budget = CycleBudget(inputs.config.budget_minutes)  # the clock starts now
    tracker = Tracker(inputs.config.report_to, inputs.work_dir, inputs.new_version)
    try:
        return _run_stages(inputs, _reporter(progress, tracker), budget)
    finally:
        tracker.close()


def _reporter(progress: Progress | None, tracker: Tracker) -> Progress:
    """Progress goes to the caller (the job's progress file, then DuckDB) and the trackers."""

    def say(stage: str, details: dict) -> None:
        if progress is not None:
            progress(stage, details)
        tracker.log(stage, details)

    return say


def _run_stages(inputs: CycleInputs, say: Progress, budget: CycleBudget) -> CycleResult:
    from transformers import AutoTokenizer

    config, revisions = inputs.config, inputs.revisions
    serving_model = inputs.serving_model  # the SFT stage, when it runs, replaces it
    rollouts = as_rollouts(inputs.serving_generate)
    seconds: dict[str, float] = {}
    sft = None
    if config.sft.enabled and revisions:
        from alignment.sft import sft_records, train_sft

        t = time.perf_counter()
        sources = {
            "demonstrations": sum(r.get("source") == "human" for r in revisions),
            "revisions": sum(r.get("source") != "human" for r in revisions),
        }
        say("sft", {"examples": len(revisions), **sources})
        examples = sft_records(revisions, config.sft.demonstration_weight)
        sft = train_sft(
            serving_model,
            examples,
            inputs.work_dir / "sft",
            config.sft,
            on_log=lambda log: say("sft", log),
        )
        sft |= sources
        seconds["sft"] = time.perf_counter() - t
        say("sft", sft)
        serving_model = sft["path"]  # the SFT model is the base and KL reference from here on
        # The engine serves the pre-SFT weights: an adapter trained on the SFT model would not
        # sample the current policy there, so rollouts stay on the serving weights.
        rollouts.stay_off_policy()

    t = time.perf_counter()
    say("reward_model", {"pairs": len(inputs.records)})
    reward = train_reward_model(
        serving_model,
        inputs.records,
        inputs.work_dir / "reward_model",
        config.reward,
        on_log=lambda log: say("reward_model", log),
        deadline=budget.reward_deadline(),
        verdicts=inputs.verdicts,
    )
    budget.reward_steps, budget.reward_planned_steps = reward.steps, reward.planned_steps
    seconds["reward_model"] = time.perf_counter() - t
    say("reward_model", {"done": True, **reward.as_dict()})

    refusal = reward_refusal(reward, config.gate)
    if refusal is not None:  # nothing worth optimising: stop before PPO spends its minutes
        say("gate", refusal.as_dict())
        return CycleResult(
            inputs.new_version,
            inputs.parent_version,
            None,
            reward.as_dict(),
            [],
            refusal.as_dict(),
            seconds,
            sft,
            budget=budget.as_dict(),
        )

    train_prompts, heldout_prompts = split_heldout(inputs.prompts, config.heldout_prompt_fraction)
    heldout_prompts = heldout_prompts or train_prompts
    scorer = RewardScorer.load(
        serving_model,
        reward.path,
        config.reward.ensemble_penalty,
        config.reward.precision,
        config.reward.base_weights,
        config.reward.attention,
    )
    tokenizer = AutoTokenizer.from_pretrained(serving_model)
    # the replies the reward models learned from bound what their scores mean (PPO and gate)
    support = reply_support(
        inputs.records,
        token_counter(tokenizer),
        config.reward.support_quantile,
        config.reward.support_fraction,
    )
    policy = PolicyWithValueHead.from_base(serving_model, config.ppo)
    trainer = PPOTrainer(policy, tokenizer, rollouts, scorer.score, config.ppo, support)
    t = time.perf_counter()
    steps = trainer.train(
        train_prompts,
        on_step=lambda s: say("ppo", {**s.as_dict(), "max_steps": config.ppo.steps}),
        should_stop=budget.ppo_stopper(config.ppo.steps),
    )
    seconds["ppo"] = time.perf_counter() - t
    budget.ppo_rounds = len(steps)

    rollouts.reset()  # the gate compares against the serving weights, not PPO's adapter
    say("ppo_rollouts", {"on_policy": rollouts.on_policy})
    t = time.perf_counter()
    say("gate", {})
    gate: GateResult = evaluate(
        policy,
        tokenizer,
        scorer.member_scores,
        rollouts,
        heldout_prompts,
        config.gate,
        support=support,
    )
    seconds["gate"] = time.perf_counter() - t
    say("gate", gate.as_dict())

    reward_summary = reward.as_dict()
    if scorer.disagreement:  # how much the members disagreed on PPO's rollouts, per round
        reward_summary["ppo_disagreement"] = scorer.disagreement
    if support is not None:
        reward_summary["support"] = support.as_dict()
    path = adapter = None
    if gate.deploy:
        t = time.perf_counter()
        if sft is None:
            adapter = str(inputs.out_root / f"{inputs.new_version}.adapter")
            policy.lm.save_pretrained(adapter)  # before the merge, which spends the adapter
        manifest = {
            "version": inputs.new_version,
            "parent": inputs.parent_version,
            "reward_model": reward.path,
            "pairs": len(inputs.records),
            "sft": sft,
            "reward": reward_summary,
            "gate": gate.as_dict(),
            "ppo_final": steps[-1].as_dict() if steps else None,
            "budget": budget.as_dict(),
        }
        path = str(
            merge_to_checkpoint(policy, tokenizer, inputs.out_root / inputs.new_version, manifest)
        )
        seconds["merge"] = time.perf_counter() - t
        say("merge", {"path": path})
    return CycleResult(
        inputs.new_version,
        inputs.parent_version,
        path,
        reward_summary,
        [s.as_dict() for s in steps],
        gate.as_dict(),
        seconds,
        sft,
        adapter,
        budget=budget.as_dict(),
    )
