"""Train and use the Bradley-Terry reward model (loss -log sigmoid(r_w - r_l)).

Training is TRL's `RewardTrainer` with a LoRA adapter on `AutoModelForSequenceClassification`
(num_labels=1) over the base checkpoint; the score head is trained in full (peft's SEQ_CLS task
saves it with the adapter). Only decisive votes are used: ties and both-bad carry no preference
(see `storage.export`). Part of the pairs is held out, split by a hash of their content so the same
pair lands on the same side in every cycle, and the held-out accuracy is reported.

Input is TRL's conversational preference format; scoring uses the same chat template as training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignment.config import RewardConfig
from alignment.losses import bradley_terry_loss, preference_accuracy


@dataclass
class RewardResult:
    path: str
    n_train: int
    n_heldout: int
    train_loss: float | None
    heldout_loss: float | None
    heldout_accuracy: float | None
    steps: int

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


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_reward_model(
    base_model: str,
    records: list[dict],
    out_dir: Path,
    config: RewardConfig,
    on_log: Callable[[dict], None] | None = None,
) -> RewardResult:
    """Train a LoRA reward model on preference records; save adapter + head to `out_dir`."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    if not records:
        raise ValueError("no decisive votes (A or B) to train a reward model on")
    train, heldout = split_heldout(records, config.heldout_fraction)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    class Relay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
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
        use_cpu=_device() == "cpu",
        bf16=False,
        seed=config.seed,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules="all-linear",
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Relay()],
    )
    output = trainer.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    heldout_loss = heldout_acc = None
    if heldout:
        scorer = RewardScorer(trainer.model, tokenizer)
        r_w = scorer.score([r["prompt"] + r["chosen"] for r in heldout])
        r_l = scorer.score([r["prompt"] + r["rejected"] for r in heldout])
        heldout_loss = bradley_terry_loss(r_w, r_l).item()
        heldout_acc = preference_accuracy(r_w, r_l)
    return RewardResult(
        str(out_dir),
        len(train),
        len(heldout),
        output.training_loss,
        heldout_loss,
        heldout_acc,
        output.global_step,
    )


class RewardScorer:
    """Scores whole conversations (prompt messages + the assistant reply) with the reward model."""

    def __init__(self, model, tokenizer, max_length: int = 1024, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(cls, base_model: str, adapter_dir: str) -> RewardScorer:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        base = AutoModelForSequenceClassification.from_pretrained(
            base_model, num_labels=1, dtype=torch.float32
        )
        base.config.pad_token_id = tokenizer.pad_token_id
        return cls(PeftModel.from_pretrained(base, adapter_dir).to(_device()), tokenizer)

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, str]]]) -> torch.Tensor:
        scores = []
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
            )
            logits = self.model(**batch.to(device)).logits  # (b, 1)
            scores.append(logits.squeeze(-1).float().cpu())
        return torch.cat(scores) if scores else torch.empty(0)
