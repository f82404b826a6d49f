"""Score conversations with a trained reward-model ensemble (`RewardScorer`), and the score
head's pooling that training and scoring share.

Scoring uses the same chat template as training; `score` is the conservative
mean - penalty * std over the members that PPO optimises.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignment.config import POOLINGS
from alignment.precision import attention_implementation, autocast, base_dtype, train_device
from alignment.trunk_cache import TrunkCache


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
