"""Train and use the Bradley-Terry reward model (loss -log sigmoid(r_w - r_l)).

Training is TRL's `RewardTrainer` with a LoRA adapter on `AutoModelForSequenceClassification`
(num_labels=1) over the base checkpoint; the score head is trained in full (peft's SEQ_CLS task
saves it with the adapter). The pairs are decisive votes: ties and both-bad carry no preference
(see `storage.export`); with `reward.verdict_pairs` their replies join as pairs across prompts
(`alignment.verdicts`). Part of the pairs is held out, split by a hash of their content so the same
pair lands on the same side in every cycle, and the held-out accuracy is reported.

Ensemble: `RewardConfig.ensemble` members, each trained on its own bootstrap resample of the
training pairs (Coste et al. 2023), or with `bootstrap` off on all of them with its own seed.
They agree where the votes say something and disagree where the votes are silent, which is
exactly where PPO finds replies that fool one model. PPO optimises the conservative score
mean - penalty * std, and the gate counts a comparison only when every member agrees. Members
share one base model in memory (one LoRA adapter and score head each).

Input is TRL's conversational preference format; scoring uses the same chat template as training.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from alignment import adapters
from alignment.budget import MIN_REWARD_STEPS, SCORE_PER_STEP, steps_that_fit
from alignment.config import POOLINGS, RewardConfig
from alignment.losses import bradley_terry_loss, preference_accuracy
from alignment.precision import (
    attention_implementation,
    autocast,
    base_dtype,
    train_device,
    use_bf16,
)
from alignment.trunk_cache import TrunkCache
from alignment.verdicts import cross_prompt_pairs, implicit


@dataclass
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


def split_heldout(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by content hash: stable across cycles as votes accumulate."""
    train, heldout = [], []
    for r in records:
        digest = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).digest()
        (heldout if digest[0] / 256 < fraction else train).append(r)
    if not train and heldout:  # tiny data: never train on nothing
        train, heldout = heldout, []
    return train, heldout


def score_head(model) -> torch.nn.Module:
    """The sequence-classification head (`score`), outermost wrapper first: with peft it is the
    ModulesToSaveWrapper that routes to the trained copy."""
    heads = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "score"]
    if not heads:
        raise ValueError("the reward model has no `score` head to pool")
    return min(heads, key=lambda nm: nm[0].count("."))[1]


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"reward.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def pool_scores(model, pooling: str) -> None:
    """Make the head's score at each position the mean of its per-token scores up to there
    (`mean`), or that plus the position's own score (`last+mean`). Transformers reads the score
    at the last non-pad token, and inputs are right-padded (TRL's collator, the scorer's
    tokenizer), so it then reads the mean over the whole conversation. The head is linear, so
    this is the head over the mean hidden state: a property spread over the reply (how many
    long words) is summed rather than left to what the last token's state remembers."""
    check_pooling(pooling)
    if pooling == "last":
        return

    def pooled(module, args, scores: torch.Tensor) -> torch.Tensor:  # (b, T, 1)
        positions = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=scores.dtype)
        running_mean = scores.cumsum(1) / positions[None, :, None]
        return running_mean if pooling == "mean" else scores + running_mean

    score_head(model).register_forward_hook(pooled)


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
    members, losses, steps, trainable, planned = [], [], 0, None, None
    step_seconds: float | None = None  # timed once, by the first model, under a deadline
    scored_after = 2 * len(records) * config.ensemble  # replies x members scored after training

    def scoring(step_s: float) -> float:
        """Seconds of the scoring that follows training, reserved out of the budget."""
        return SCORE_PER_STEP * step_s * scored_after

    warm = warm_start_share(config)
    shared, shared_steps = None, None
    if warm:  # one model on every vote first, for the share of the time `warm_start` gives it
        shared = out_dir / "shared"
        _, shared_steps, _, _, step_seconds = _train_member(
            base_model,
            train + extra,
            shared,
            replace(config, epochs=warm * config.epochs * config.ensemble),
            config.seed + 999,
            lambda log: on_log({"member": "shared", **log}) if on_log else None,
            (lambda s: warm * (deadline - time.monotonic() - scoring(s)))
            if deadline is not None
            else None,
            None,
            trunk,
        )
    member_config = replace(config, epochs=(1 - warm) * config.epochs) if warm else config
    for i in range(config.ensemble):
        data = member_votes(train + extra, config, config.seed * 1000 + i)

        def relay(log: dict, i: int = i) -> None:
            if on_log:
                on_log({"member": i, **log})

        def seconds_for(step_s: float, left: int = config.ensemble - i) -> float:
            """This member's share of the time left, after the scoring that follows."""
            return (deadline - time.monotonic() - scoring(step_s)) / left

        loss, steps, trainable, planned, step_seconds = _train_member(
            base_model,
            data,
            out_dir / f"member-{i}",
            member_config,
            config.seed + i,
            relay,
            seconds_for if deadline is not None else None,
            step_seconds,
            trunk,
            start_from=shared,
        )
        members.append(f"member-{i}")
        losses.append(loss)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)  # the members carry on from it: spent
    ensemble = {
        "members": members,
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

    result = RewardResult(
        str(out_dir),
        len(train),
        len(heldout),
        sum(losses) / len(losses),
        None,
        None,
        steps,
        members=len(members),
        adapter=config.adapter,
        trainable_parameters=trainable,
        planned_steps=planned,
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
) -> tuple[float, int, int, int, float | None]:
    """One reward model with TRL's RewardTrainer. `seconds_for(step seconds)` is the time this
    member may train (None: no budget); `step_seconds` a step time already measured;
    `start_from`: a saved adapter and head to go on training (`reward.warm_start`). Returns
    (training loss, steps, trainable parameters, planned steps, step seconds)."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
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

    class Relay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    args = TRLRewardConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
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
        callbacks=[Relay()],
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
    return output.training_loss, output.global_step, trainable, planned, step_seconds


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


class RewardScorer:
    """Scores whole conversations (prompt messages + the assistant reply) with every member of
    the ensemble; `score` is the conservative mean - penalty * std that PPO optimises."""

    def __init__(
        self,
        model,
        tokenizer,
        adapters: list[str] | None = None,
        penalty: float = 1.0,
        scale: list[list[float]] | None = None,
        precision: str = "auto",
        max_length: int = 1024,
        batch_size: int = 8,
        trunk: TrunkCache | None = None,
        keep_trunk: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters or [None]
        self.penalty = penalty
        self.scale = scale  # per member (mean, std) of its raw scores on the voted replies
        self.precision = precision
        self.max_length = max_length
        self.batch_size = batch_size
        self.disagreement: list[float] = []  # mean member std of each `score` call
        self.trunk = trunk  # the members' shared frozen bottom: run once per batch
        self.keep_trunk = keep_trunk  # False: forget each batch's states once scored

    @classmethod
    def load(
        cls,
        base_model: str,
        ensemble_dir: str,
        penalty: float = 1.0,
        precision: str = "auto",
        base_weights: str = "auto",
        attention: str = "auto",
        trunk: TrunkCache | None = None,
    ) -> RewardScorer:
        """`trunk`: a cache that already holds bottom states of these conversations (the
        one training filled); without it one is made when the members share a frozen bottom."""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        root = Path(ensemble_dir)
        ensemble = json.loads((root / "ensemble.json").read_text())
        members = ensemble["members"]
        tokenizer = AutoTokenizer.from_pretrained(root / members[0])
        tokenizer.padding_side = "right"  # pooling reads the score at the last non-pad token
        base = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            num_labels=1,
            dtype=base_dtype(base_weights, train_device()),
            attn_implementation=attention_implementation(attention, train_device()),
        )
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, str(root / members[0]), adapter_name=members[0])
        for name in members[1:]:
            model.load_adapter(str(root / name), adapter_name=name)
        pool_scores(model, ensemble.get("pooling", "last"))
        bottom, keep = ensemble.get("frozen_bottom", 0), trunk is not None
        if bottom:
            trunk = trunk or TrunkCache(bottom)
            trunk.install(model)
        scale = ensemble.get("scale")
        model = model.to(train_device())
        return cls(
            model, tokenizer, members, penalty, scale, precision, trunk=trunk, keep_trunk=keep
        )

    @torch.no_grad()
    def member_scores(self, conversations: list[list[dict[str, str]]]) -> torch.Tensor:
        """(K, B): each member's score of each conversation, on the member's common scale."""
        per_member: list[list[torch.Tensor]] = [[] for _ in self.adapters]
        device = next(self.model.parameters()).device
        for i in range(0, len(conversations), self.batch_size):
            texts = [
                self.tokenizer.apply_chat_template(c, tokenize=False)
                for c in conversations[i : i + self.batch_size]
            ]
            batch = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(device)
            for k, name in enumerate(self.adapters):
                if name is not None:
                    self.model.set_adapter(name)
                with autocast(self.precision, str(device)):
                    logits = self.model(**batch).logits  # (b, 1)
                per_member[k].append(logits.squeeze(-1).float().cpu())
            if self.trunk is not None and not self.keep_trunk:
                self.trunk.clear()  # every member has read it: PPO's batches are all new
        if not conversations:
            return torch.empty(len(self.adapters), 0)
        scores = torch.stack([torch.cat(m) for m in per_member])  # (K, B)
        if self.scale:
            mean, std = torch.tensor(self.scale).T  # (K,), (K,)
            scores = (scores - mean[:, None]) / std[:, None]
        return scores

    def score(self, conversations: list[list[dict[str, str]]]) -> torch.Tensor:
        """(B,) mean - penalty * std over members: a reply only scores high if every member
        thinks so (with one member, the plain score)."""
        scores = self.member_scores(conversations)
        if scores.shape[0] < 2:
            return scores[0]
        std = scores.std(0)
        self.disagreement.append(std.mean().item())
        return scores.mean(0) - self.penalty * std
