"""One retrain cycle, as a plain function over files and callbacks (no database, no server):

  preference records -> reward model -> PPO on LoRA (rollouts from the serving engine)
  -> gate against the serving policy -> merge into a new numbered version with a manifest.

Hot-swapping the result into the engine and recording it in DuckDB belong to the caller, which owns
the engine and the store. `progress` receives (stage, details) as the cycle goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from alignment.budget import CycleBudget
from alignment.config import CycleConfig
from alignment.gate import GateResult, evaluate, reward_refusal
from alignment.job import JobResult
from alignment.merge import merge_to_checkpoint
from alignment.ppo import PolicyWithValueHead, PPOTrainer
from alignment.reward_model import RewardScorer, split_heldout, train_reward_model
from alignment.rollouts import as_rollouts
from alignment.support import reply_support, token_counter
from alignment.tracking import Tracker

Progress = Callable[[str, dict], None]
__all__ = ["CycleConfig", "CycleResult", "run_cycle"]


CycleResult = JobResult  # what a cycle returns is what the worker hands the app


def run_cycle(
    serving_model: str,
    parent_version: str,
    new_version: str,
    records: list[dict],
    prompts: list[list[dict[str, str]]],
    serving_generate,
    out_root: Path,
    config: CycleConfig,
    progress: Progress | None = None,
    revisions: list[dict] | None = None,
    verdicts: list[dict] | None = None,
) -> CycleResult:
    """`verdicts`: the replies of ties and both-bad votes (`storage.export.verdict_records`),
    which the reward models train on as `reward.verdict_pairs` says."""
    seconds: dict[str, float] = {}
    budget = CycleBudget(config.budget_minutes)  # the clock starts now
    work = out_root / "runs" / new_version
    tracker = Tracker(config.report_to, work, new_version)
    try:
        return _run_stages(
            serving_model,
            parent_version,
            new_version,
            records,
            prompts,
            as_rollouts(serving_generate),
            out_root,
            config,
            _reporter(progress, tracker),
            revisions,
            seconds,
            work,
            budget,
            verdicts,
        )
    finally:
        tracker.close()


def _reporter(progress: Progress | None, tracker: Tracker) -> Progress:
    """Progress goes to the caller (the job's progress file, then DuckDB) and the trackers."""

    def say(stage: str, details: dict) -> None:
        if progress is not None:
            progress(stage, details)
        tracker.log(stage, details)

    return say


def _run_stages(
    serving_model: str,
    parent_version: str,
    new_version: str,
    records: list[dict],
    prompts: list[list[dict[str, str]]],
    serving_generate,
    out_root: Path,
    config: CycleConfig,
    say: Progress,
    revisions: list[dict] | None,
    seconds: dict[str, float],
    work: Path,
    budget: CycleBudget,
    verdicts: list[dict] | None = None,
) -> CycleResult:
    from transformers import AutoTokenizer

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
            serving_model, examples, work / "sft", config.sft, on_log=lambda log: say("sft", log)
        )
        sft |= sources
        seconds["sft"] = time.perf_counter() - t
        say("sft", sft)
        serving_model = sft["path"]  # the SFT model is the base and KL reference from here on
        # The engine serves the pre-SFT weights: an adapter trained on the SFT model would not
        # sample the current policy there, so rollouts stay on the serving weights.
        serving_generate.stay_off_policy()

    t = time.perf_counter()
    say("reward_model", {"pairs": len(records)})
    reward = train_reward_model(
        serving_model,
        records,
        work / "reward_model",
        config.reward,
        on_log=lambda log: say("reward_model", log),
        deadline=budget.reward_deadline(),
        verdicts=verdicts,
    )
    budget.reward_steps, budget.reward_planned_steps = reward.steps, reward.planned_steps
    seconds["reward_model"] = time.perf_counter() - t
    say("reward_model", {"done": True, **reward.as_dict()})

    refusal = reward_refusal(reward, config.gate)
    if refusal is not None:  # nothing worth optimising: stop before PPO spends its minutes
        say("gate", refusal.as_dict())
        return CycleResult(
            new_version,
            parent_version,
            None,
            reward.as_dict(),
            [],
            refusal.as_dict(),
            seconds,
            sft,
            budget=budget.as_dict(),
        )

    train_prompts, heldout_prompts = split_heldout(prompts, config.heldout_prompt_fraction)
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
        records,
        token_counter(tokenizer),
        config.reward.support_quantile,
        config.reward.support_fraction,
    )
    policy = PolicyWithValueHead.from_base(serving_model, config.ppo)
    trainer = PPOTrainer(policy, tokenizer, serving_generate, scorer.score, config.ppo, support)
    t = time.perf_counter()
    steps = trainer.train(
        train_prompts,
        on_step=lambda s: say("ppo", {**s.as_dict(), "max_steps": config.ppo.steps}),
        should_stop=budget.ppo_stopper(config.ppo.steps),
    )
    seconds["ppo"] = time.perf_counter() - t
    budget.ppo_rounds = len(steps)

    serving_generate.reset()  # the gate compares against the serving weights, not PPO's adapter
    say("ppo_rollouts", {"on_policy": serving_generate.on_policy})
    t = time.perf_counter()
    say("gate", {})
    gate: GateResult = evaluate(
        policy,
        tokenizer,
        scorer.member_scores,
        serving_generate,
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
            adapter = str(out_root / f"{new_version}.adapter")
            policy.lm.save_pretrained(adapter)  # before the merge, which spends the adapter
        manifest = {
            "version": new_version,
            "parent": parent_version,
            "reward_model": reward.path,
            "pairs": len(records),
            "sft": sft,
            "reward": reward_summary,
            "gate": gate.as_dict(),
            "ppo_final": steps[-1].as_dict() if steps else None,
            "budget": budget.as_dict(),
        }
        path = str(merge_to_checkpoint(policy, tokenizer, out_root / new_version, manifest))
        seconds["merge"] = time.perf_counter() - t
        say("merge", {"path": path})
    return CycleResult(
        new_version,
        parent_version,
        path,
        reward_summary,
        [s.as_dict() for s in steps],
        gate.as_dict(),
        seconds,
        sft,
        adapter,
        budget=budget.as_dict(),
    )
