"""Typed configuration of the alignment stages, one dataclass per stage.

Defaults target the embedded default on a 2-core CPU; `fast()` variants are for tests on the
tiny model. Every field has a default and a one-line help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage.settings import setting, updated


def _attention():
    """The same `attention` setting in every training stage."""
    return setting(
        "attention kernel: 'auto' (eager on the CPU, whose fused kernel's backward pass is slow; "
        "sdpa on a GPU), 'eager' or 'sdpa'",
        default="auto",
    )


@dataclass
class RewardConfig:
    """Bradley-Terry reward model: an adapter (LoRA by default) and a sequence-classification
    head over the base model."""

    adapter: str = setting(
        "parameter-efficient method: lora, ia3, prompt_tuning or prefix_tuning "
        "(alignment/adapters.py)",
        default="lora",
    )

    lora_rank: int = setting("LoRA rank of the reward model adapter", default=8)
    lora_alpha: int = setting("LoRA alpha (scale = alpha / rank)", default=16)
    lora_layers: int = setting(
        "LoRA on the top N transformer layers only (0: every layer); the frozen layers below run "
        "once per conversation for every member, epoch and scoring pass "
        "(alignment/trunk_cache.py) and the backward pass stops at the lowest adapted layer",
        default=0,
    )
    gradient_checkpointing: bool = setting(
        "recompute activations in the backward pass to save memory (TRL turns it on by default; "
        "it costs a third more compute and makes gradients flow through every layer: worth it "
        "only for a large model on a GPU)",
        default=False,
    )
    # ~100 votes are ~10 steps an epoch: at 2e-4 x 2 epochs the heads barely left their
    # initialisation (training loss ln 2, chance on unseen replies); bench/RESULTS.md
    learning_rate: float = setting("AdamW learning rate", default=2e-3)
    epochs: float = setting("passes over the training pairs", default=4.0)
    batch_size: int = setting("pairs per optimisation step", default=8)
    max_length: int = setting(
        "longest prompt+reply in tokens; longer pairs are dropped", default=512
    )
    heldout_fraction: float = setting("share of pairs held out to measure accuracy", default=0.2)
    ensemble: int = setting(
        "reward models trained, each on a bootstrap resample of the votes (1: a single model)",
        default=3,
    )
    # on SmolLM2 neither won: false moved `plain`'s misses to another seed and left `opening` 2
    # with more very short replies (bench/RESULTS.md, "Members on all the votes")
    bootstrap: bool = setting(
        "each member trains on a bootstrap resample of the votes; false: on all of them, the "
        "members differing only by seed",
        default=True,
    )
    subsample: float = setting(
        "each member trains on this share of the votes, drawn without replacement, instead of a "
        "bootstrap resample (which holds about 63 % of them): more of ~100 votes per member, "
        "members still different; 0: off",
        default=0.0,
    )
    # offline on `opening`, 0.5 took the ensemble from 0.80 to 0.91 and from 0.78 to 0.94 on
    # unseen pairs (bench/RESULTS.md, "Members that go on from one model on every vote")
    warm_start: float = setting(
        "share of the reward models' training spent on one model on every vote, which each "
        "member then goes on training on its own resample (the rest of the time); 0: every "
        "member from scratch. Members come out stronger for the same steps, and closer",
        default=0.5,
    )
    verdict_pairs: float = setting(
        "ties and both-bad votes as training pairs across prompts, a reply the user let stand "
        "over one they refused (alignment/verdicts.py): at most this many per decisive vote; "
        "0: decisive votes only",
        default=0.0,
    )
    ensemble_penalty: float = setting(
        "PPO optimises mean - penalty * std of the members' scores (Coste et al. 2023)",
        default=1.0,
    )
    support_quantile: float = setting(
        "replies shorter than support_fraction of this quantile of the voted replies' lengths "
        "lie outside what the reward models learned: PPO is penalised for them and the gate "
        "does not trust them (alignment/support.py); 0 disables",
        default=0.05,
    )
    # 0.5: SmolLM2 learned the `complete` taste at about 0.75 of v0's length and collapsed under
    # 0.4 of it (bench/RESULTS.md, "A length bound from the votes")
    support_fraction: float = setting(
        "how far under the voted replies' short quantile (support_quantile) a reply may go, as a "
        "fraction of it, and still be judged: lower lets replies grow shorter than the votes",
        default=0.5,
    )
    # on unseen pairs, 'last+mean' took `plain` from about 0.65 to 0.70 and kept `complete` at
    # 1.00 AUC, where 'mean' alone fell to 0.63 (bench/RESULTS.md, "A score head that reads the
    # whole reply")
    pooling: str = setting(
        "what the score head reads: 'last' (the last token's state, the usual sequence-"
        "classification head), 'mean' (its per-token scores averaged over the conversation) or "
        "'last+mean' (both added). A preference spread over the whole reply, like a count of "
        "long words, reaches the last token only through the model's state; 'mean' alone loses "
        "a cue at the end (a reply cut off)",
        default="last+mean",
    )
    seed: int = setting("seed of the head initialisation and data order", default=0)
    precision: str = setting(
        "'auto' (bf16 autocast where the CPU or GPU computes bf16 natively), 'bf16' or 'fp32'",
        default="auto",
    )
    base_weights: str = setting(
        "dtype of the frozen base weights: 'auto' (bf16 on a GPU, fp32 on the CPU), 'bf16' or "
        "'fp32'; adapters and optimiser state stay fp32",
        default="auto",
    )
    attention: str = _attention()


@dataclass
class PPOConfig:
    """PPO with a per-token KL penalty against the adapter-disabled reference, on LoRA."""

    adapter: str = setting(
        "lora: vLLM samples the rollouts and serves canaries from a LoRA adapter", default="lora"
    )
    steps: int = setting("rollout-and-update rounds per cycle", default=12)
    prompts_per_step: int = setting("prompts rolled out per round", default=8)
    samples_per_prompt: int = setting(
        "replies sampled per prompt in a round; the others' mean is each one's baseline (RLOO)",
        default=4,
    )
    advantage: str = setting(
        "advantage estimator: 'rloo' (leave-one-out baseline over replies to the same prompt, "
        "no value head) or 'gae' (value head and GAE)",
        default="rloo",
    )
    max_new_tokens: int = setting("rollout reply length in tokens", default=64)
    temperature: float = setting("rollout sampling temperature", default=1.0)
    ppo_epochs: int = setting("optimisation passes over each round's rollouts", default=2)
    max_step_kl: float = setting(
        "trust region: stop a round's updates once the policy is this far (mean per-token KL, "
        "nats) from the one that sampled it; 0 disables",
        default=0.02,
    )
    minibatch_size: int = setting("rollouts per gradient step", default=8)
    # 4e-4: within the 15-minute budget a cycle has 8 rounds on a 2-core CPU, not 12; at 2e-4
    # they left `plain` 2 at KL 1.5 and refused, at 4e-4 it reached 3.9 and won 0.79 (RESULTS)
    learning_rate: float = setting("AdamW learning rate of LoRA and value head", default=4e-4)
    lora_rank: int = setting("LoRA rank of the policy adapter", default=8)
    lora_alpha: int = setting("LoRA alpha", default=16)
    init_kl_coef: float = setting("initial beta of the KL penalty", default=0.2)
    adaptive_kl: bool = setting("adapt beta toward target_kl (Ziegler et al.)", default=True)
    target_kl: float = setting(
        "target KL (nats per response) of the adaptive controller", default=6.0
    )
    kl_horizon: int = setting("horizon of the adaptive KL controller", default=10000)
    gamma: float = setting("discount", default=1.0)
    lam: float = setting("GAE lambda", default=0.95)
    cliprange: float = setting("policy ratio clip", default=0.2)
    cliprange_value: float = setting("value clip", default=0.2)
    vf_coef: float = setting("value loss weight", default=0.1)
    max_grad_norm: float = setting("gradient clipping", default=1.0)
    missing_eos_penalty: float = setting(
        "subtracted from the (scaled) score of a rollout cut off at max_new_tokens, so the "
        "policy learns to finish its replies (Huang et al. 2024); 0 disables",
        default=1.0,
    )
    short_reply_penalty: float = setting(
        "a rollout shorter than the voted replies (reward.support_quantile), where the reward "
        "models' scores mean nothing, scores this much under the lowest judged rollout of its "
        "round, whatever the reward models say of it; 0 disables",
        default=1.0,
    )
    normalize_scores: bool = setting(
        "put reward-model scores on the unit scale of the first rollout batch", default=True
    )
    seed: int = setting("seed of rollouts and updates", default=0)
    precision: str = setting(
        "'auto' (bf16 autocast where the CPU or GPU computes bf16 natively), 'bf16' or 'fp32'",
        default="auto",
    )
    base_weights: str = setting(
        "dtype of the frozen base weights: 'auto' (bf16 on a GPU, fp32 on the CPU), 'bf16' or "
        "'fp32'; adapters and optimiser state stay fp32",
        default="auto",
    )
    attention: str = _attention()


@dataclass
class GateConfig:
    """What a new policy must show on held-out prompts before it is served."""

    min_win_rate: float = setting(
        "the 95 % lower bound of the new version's win rate over the serving one (comparisons "
        "every reward model agrees on) must reach this",
        default=0.5,
    )
    max_kl: float = setting("largest mean KL(new || reference) per reply, nats", default=10.0)
    max_kl_per_token: float = setting(
        "largest KL(new || reference) per reply token, nats: a collapse into very short "
        "replies passes the per-reply limit but not this one",
        default=0.5,
    )
    eval_prompts: int = setting(
        "held-out prompts compared, samples_per_prompt replies each; the reward models may "
        "agree on under half of the comparisons, and a 0.7 win rate on fewer than about 25 "
        "agreed ones cannot be told from chance",
        default=32,
    )
    samples_per_prompt: int = setting("replies per held-out prompt from each version", default=2)
    max_new_tokens: int = setting("reply length in the comparison", default=64)
    max_short_share: float = setting(
        "refuse a version when the share of its replies shorter than the voted ones "
        "(reward.support_quantile) exceeds the serving version's share by more than this",
        default=0.15,
    )
    min_rm_accuracy: float = setting(
        "refuse the cycle when the reward models agree with fewer of the held-out human votes "
        "than this (near chance: they learned nothing to optimise)",
        default=0.6,
    )
    min_rm_heldout: int = setting(
        "held-out votes needed before that check applies (fewer cannot tell)", default=5
    )


@dataclass
class LoopConfig:
    """When the background scheduler starts a cycle by itself (0 disables a trigger)."""

    every_votes: int = setting("start a cycle after this many new decisive votes", default=50)
    every_minutes: float = setting(
        "or after this many minutes, if any new decisive vote came", default=60.0
    )
    poll_seconds: float = setting("how often the scheduler checks", default=10.0)
    keep_versions: int = setting(
        "after each deployment delete the checkpoints of all but this many newest versions "
        "(serving, previous and a challenger are always kept; 0 keeps everything; a 7B "
        "checkpoint is about 15 GB)",
        default=5,
    )
    max_source_share: float = setting(
        "the most of the decisive votes one session or one client address may cast: a "
        "scheduled cycle is refused past it, and reward-model training and a canary's verdict "
        "count no more of one source's votes (default 0: 0.5, or 1, no cap, with "
        "--single-user)",
        default=0.0,
    )
    ray_address: str | None = setting(
        "run each cycle as a job on this Ray cluster (its dashboard's address, e.g. "
        "http://head:8265) instead of a child process here; the data directory, this Python "
        "and this code must be at the same paths on its nodes (docs/deployment.md); needs the "
        "`cluster` extra",
        default=None,
    )
    cycle_gpus: int = setting(
        "GPUs each cycle's Ray job asks for, with --ray-address (0: a CPU-only Ray cluster)",
        default=1,
    )


@dataclass
class CanaryConfig:
    """How a version that passed the automatic gate is judged by the users before it takes all
    traffic (see `alignment.canary` for the decision rule)."""

    share: float = setting(
        "share of turns whose pair sets the challenger against the serving version "
        "(0: deploy at the gate, no canary)",
        default=0.5,
    )
    min_votes: int = setting(
        "comparisons (decisive votes and ties on canary pairs) before a challenger can be promoted",
        default=30,
    )
    max_votes: int = setting(
        "at this many comparisons without a verdict the challenger is retired (0: no cap)",
        default=200,
    )


@dataclass
class SFTConfig:
    """Optional supervised stage on constitutional revisions and the replies users wrote
    themselves (demonstrations), loss on reply tokens only."""

    enabled: bool = setting(
        "fine-tune on (prompt, final revision) before the reward model", default=False
    )
    demonstration_weight: int = setting(
        "times each human demonstration counts against one AI revision", default=3
    )
    adapter: str = setting(
        "lora or ia3: what SFT trains is merged into the served weights", default="lora"
    )
    lora_rank: int = setting("LoRA rank of the SFT adapter", default=8)
    lora_alpha: int = setting("LoRA alpha", default=16)
    learning_rate: float = setting("AdamW learning rate", default=2e-4)
    epochs: float = setting("passes over the revisions", default=1.0)
    batch_size: int = setting("examples per step", default=8)
    max_length: int = setting("longest prompt+revision in tokens", default=512)
    gradient_checkpointing: bool = setting(
        "recompute activations to save memory (TRL's default is on; see reward)", default=False
    )
    base_weights: str = setting(
        "dtype of the frozen base weights: 'auto' (bf16 on a GPU, fp32 on the CPU)",
        default="auto",
    )
    attention: str = _attention()


@dataclass
class CycleConfig:
    """Everything one retrain cycle needs, stage by stage."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    heldout_prompt_fraction: float = 0.25
    budget_minutes: float = setting(
        "wall-clock budget of a cycle: the reward models and PPO take the steps and rounds "
        "that fit, timed on this machine (alignment/budget.py); 0: all the preset asks, "
        "however long it takes",
        default=15.0,
    )
    report_to: list[str] = setting(
        "trackers that also receive every stage's metrics: tensorboard, wandb, mlflow, trackio "
        "or none (alignment/tracking.py); all but tensorboard come with the `trackers` extra",
        default_factory=list,
    )


PRESETS = ("default", "fast")
PRECISIONS = ("auto", "bf16", "fp32")
ATTENTIONS = ("auto", "eager", "sdpa")
ADVANTAGES = ("rloo", "gae")
POOLINGS = ("last", "mean", "last+mean")


def check(config: CycleConfig) -> CycleConfig:
    """Settings that are each well-typed but wrong, refused with the fix (at start-up, not in
    the middle of a cycle)."""
    problems = [
        (config.ppo.advantage in ADVANTAGES, f"ppo.advantage must be one of {ADVANTAGES}"),
        (
            config.ppo.advantage != "rloo" or config.ppo.samples_per_prompt >= 2,
            "ppo.advantage 'rloo' needs ppo.samples_per_prompt >= 2 (or use 'gae')",
        ),
        (config.ppo.precision in PRECISIONS, f"ppo.precision must be one of {PRECISIONS}"),
        (config.reward.precision in PRECISIONS, f"reward.precision must be one of {PRECISIONS}"),
        (config.ppo.base_weights in PRECISIONS, f"ppo.base_weights must be one of {PRECISIONS}"),
        (
            config.reward.base_weights in PRECISIONS,
            f"reward.base_weights must be one of {PRECISIONS}",
        ),
        *(
            (
                getattr(config, stage).attention in ATTENTIONS,
                f"{stage}.attention must be one of {ATTENTIONS}",
            )
            for stage in ("reward", "ppo", "sft")
        ),
        (config.reward.ensemble >= 1, "reward.ensemble must be at least 1"),
        (
            config.reward.pooling in POOLINGS,
            f"reward.pooling must be one of {', '.join(POOLINGS)}, got {config.reward.pooling!r}",
        ),
        (
            0 <= config.reward.subsample <= 1,
            f"reward.subsample must be a share from 0 to 1, got {config.reward.subsample}",
        ),
        (
            config.reward.lora_layers >= 0,
            f"reward.lora_layers must be 0 (all) or positive, got {config.reward.lora_layers}",
        ),
        (
            0 <= config.reward.warm_start < 1,
            "reward.warm_start must be a share from 0 to under 1",
        ),
        (config.gate.samples_per_prompt >= 1, "gate.samples_per_prompt must be at least 1"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)
    from alignment.adapters import adapter_problem
    from alignment.tracking import check_trackers

    for stage in ("reward", "sft", "ppo"):
        problem = adapter_problem(stage, getattr(config, stage).adapter)
        if problem is not None:
            raise ValueError(problem)
    check_trackers(config.report_to)
    return config


def preset(name: str) -> CycleConfig:
    """Named starting points: `default` asks 4 reward-model epochs and 12 PPO rounds of 8
    prompts x 4 replies of 64 tokens, cut to what fits `budget_minutes` (15) on the machine: on
    a 2-core AVX-512-BF16 CPU about 28 of 40 reward-model steps and 8 of 12 rounds for 100 votes
    (bench/RESULTS.md); `fast` finishes in seconds on the tiny test model."""
    if name == "fast":
        return CycleConfig(
            reward=RewardConfig(
                learning_rate=5e-3, epochs=1, batch_size=8, max_length=256, ensemble=2
            ),
            ppo=PPOConfig(
                steps=1, prompts_per_step=4, max_new_tokens=8, minibatch_size=2, ppo_epochs=1
            ),
            gate=GateConfig(
                eval_prompts=2,
                samples_per_prompt=1,
                max_new_tokens=8,
                min_win_rate=0.0,
                max_kl=1e9,
                max_kl_per_token=1e9,
                min_rm_accuracy=0.0,
            ),
        )
    if name == "default":
        return CycleConfig()
    raise ValueError(f"unknown retrain preset {name!r}: use one of {', '.join(PRESETS)}")


def cycle_config(preset_name: str, overrides: dict[str, Any] | None = None) -> CycleConfig:
    """A preset with fields overridden, e.g. {"ppo": {"steps": 16}, "gate": {"max_kl": 4}}
    (what `--retrain-config FILE` holds), checked. The app resolves its cycle once at start
    (`assistant.config.AppConfig.validate`); this is for scripts and tests."""
    return check(override(preset(preset_name), overrides or {}))


def override(config: CycleConfig, overrides: dict[str, Any]) -> CycleConfig:
    """`config` with the fields `overrides` names replaced, section by section (the fields a
    section does not name keep their values): how each source of settings (a --config file's
    `retrain` section, a --retrain-config file, the flags) applies over the ones before it.
    An unknown section or field or a wrong type raises ValueError naming the entry, so a typo
    fails at start-up rather than silently; `check` then judges the result as a whole."""
    return updated(config, overrides)
